"""One way to write a train step: `Trainer` / `make_train_step`.

A `Trainer` is built from an NNX model, any optax transformation, a loss
function and a mesh, and a *strategy* that says what is split where:

| strategy    | parameters            | gradients (per step)            | optimizer state   |
| ----------- | --------------------- | ------------------------------- | ----------------- |
| ``dp``      | replicated            | all-reduced, full               | replicated        |
| ``zero1``   | replicated            | all-reduced, then sliced to 1/N | 1/N per device    |
| ``zero2``   | replicated            | reduce-scattered to 1/N         | 1/N per device    |
| ``fsdp``    | 1/N (by the layers)   | reduce-scattered by the layers  | split like params |
| ``fsdp+tp`` | 1/(N*M) (the layers)  | reduce-scattered by the layers  | split like params |

It returns a functional `TrainState` and a jitted `step(state, batch) ->
(state, metrics)` that donates the old state.

dp / zero1 / zero2: the step is one `jax.shard_map` over the mesh. Each
device computes the gradient of its part of the batch (over `accum_steps`
micro-batches, summed locally), the gradients are reduced once per step and
per bucket, optax runs on the full gradients (dp) or on this device's flat
shards (zero1/2), and the updated shards are all-gathered into the
replicated parameters, one all-gather per bucket.

fsdp / fsdp+tp: the model is made of `shardlax.nn` layers whose parameters
are already split over the fsdp (and model) axes; their shard_maps gather
the parameters on use and reduce-scatter the gradients. The step takes the
gradient on global arrays and runs optax in a `shard_map` over the
parameters' own specs, so the update is local and the global norm of
`clip_by_global_norm` is reduced over the axes each parameter is split over.

`loss_fn(model, batch) -> scalar` must return the *mean* over the batch it
is given; the step's loss and gradients are those of the mean over the global
batch, so they equal single-device training on the whole batch.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import zero
from shardlax._axes import DATA, FSDP, MODEL
from shardlax._train_steps import TrainState, _Steps
from shardlax.audit import Declared, hlo_dtype
from shardlax.mesh import axes_size, check_axis, live_axes, place, resolve_mesh
from shardlax.nn._base import ShardedLayer, gather_hlo_dtype
from shardlax.precision import MixedPrecision

#: The strategies `Trainer` implements.
STRATEGIES = ("dp", "zero1", "zero2", "fsdp", "fsdp+tp")
#: Strategies whose parameters are sharded by the model's layers (shardlax.nn).
LAYER_SHARDED = ("fsdp", "fsdp+tp")

_OWNER = "Trainer"


class Trainer(_Steps):
    """Builds and runs the train step of one model under one parallelism strategy.

    Args:
      model: an NNX module; its `nnx.Param`s are trained, its other state is
        passed to `loss_fn` unchanged.
      tx: any optax `GradientTransformation`. Under zero1/zero2 it runs on
        flat per-parameter shards: elementwise transforms are exact, and the
        global norm of `optax.clip_by_global_norm` is made exact by
        `optax_norm_hook` (see `shardlax.zero`).
      loss_fn: `loss_fn(model, batch) -> scalar`, the mean loss over `batch`
        (a pytree of arrays whose leading dim is the batch).
      mesh: the mesh; default the one set with `jax.set_mesh`.
      strategy: one of `STRATEGIES`.
      accum_steps: split each device's part of the batch into this many
        micro-batches, run them one after another (`lax.scan`) and sum their
        gradients locally; the cross-device reduction runs once per step.
      data_axis: the mesh axis (or axes) the batch and the ZeRO state are split
        over (default ``'data'``).
      bucket_bytes: capacity of a gradient / parameter bucket in bytes (one
        collective per bucket), or None for one bucket per dtype.
      optax_norm_hook: trace `tx.update` under `shardlax.zero.global_norm_hook`
        so `optax.clip_by_global_norm` uses the true global norm (default
        True). Set False only if `tx` uses `shardlax.zero.clip_by_global_norm`
        or no norm at all.
      mixed_precision: zero1/zero2 only, a `shardlax.precision.MixedPrecision`:
        the replicated parameters are kept, computed with and all-gathered in
        `param_dtype` (a bf16 gather moves half the bytes), gradients are
        reduced in `reduce_dtype`, and the optimizer updates f32 *master*
        shards (`TrainState.master`), as ZeRO with fp16/bf16 training does.
        (For fsdp, give the policy to the `shardlax.nn` layers instead.)

    Example:
      >>> mesh = shardlax.make_mesh(data=8)  # doctest: +SKIP
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))  # doctest: +SKIP
      >>> trainer = Trainer(model, tx, loss_fn, mesh=mesh, strategy="zero2")  # doctest: +SKIP
      >>> state = trainer.init()  # doctest: +SKIP
      >>> state, metrics = trainer.step(state, batch)  # doctest: +SKIP
      >>> model = trainer.model(state)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Any], jax.Array],
        *,
        mesh: Mesh | None = None,
        strategy: str = "zero2",
        accum_steps: int = 1,
        data_axis: str | Sequence[str] = DATA,
        fsdp_axis: str = FSDP,
        tp_axis: str = MODEL,
        bucket_bytes: int | None = zero.DEFAULT_BUCKET_BYTES,
        optax_norm_hook: bool = True,
        mixed_precision: MixedPrecision | None = None,
        _cast_params: bool = True,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"{_OWNER}(strategy={strategy!r}): unknown strategy. Choose one of "
                f"{STRATEGIES}, e.g. strategy='zero2'."
            )
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"{_OWNER}(tx={tx!r}): expected an optax.GradientTransformation, got "
                f"{type(tx).__name__}. Pass e.g. optax.adamw(1e-3)."
            )
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"{_OWNER}(model=...): expected a flax.nnx.Module, got {type(model).__name__}."
            )
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(
                f"{_OWNER}(accum_steps={accum_steps!r}): expected a positive int, the number "
                f"of micro-batches per step. Pass accum_steps=1 for no accumulation."
            )
        self.mesh = resolve_mesh(mesh, _OWNER)
        self.data_axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
        for a in self.data_axes:
            check_axis(self.mesh, a, _OWNER, "data_axis")
        self.strategy = strategy
        self.layer_sharded = strategy in LAYER_SHARDED
        if self.layer_sharded:
            # the batch is split over the data axes and the fsdp axis
            check_axis(self.mesh, fsdp_axis, _OWNER, "fsdp_axis")
            if strategy == "fsdp+tp":
                check_axis(self.mesh, tp_axis, _OWNER, "tp_axis")
            self.data_axes = (*self.data_axes, fsdp_axis)
        self.fsdp_axis, self.tp_axis = fsdp_axis, tp_axis
        self.live = live_axes(self.mesh, self.data_axes)
        self.n = axes_size(self.mesh, self.data_axes)
        self.tx = tx
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.optax_norm_hook = optax_norm_hook
        if mixed_precision is not None:
            if not isinstance(mixed_precision, MixedPrecision):
                raise TypeError(
                    f"{_OWNER}(mixed_precision={mixed_precision!r}): expected a "
                    f"shardlax.precision.MixedPrecision or None, got "
                    f"{type(mixed_precision).__name__}. Pass MixedPrecision("
                    f"param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
                )
            if strategy not in ("zero1", "zero2"):
                raise ValueError(
                    f"{_OWNER}(strategy={strategy!r}, mixed_precision=...): the Trainer keeps "
                    f"f32 master shards only under zero1/zero2. Use strategy='zero2' (same "
                    f"gradient bytes as dp, 1/N of the state), or for fsdp give "
                    f"mixed_precision= to the shardlax.nn layers."
                )
        self.mixed_precision = mixed_precision
        self._cast_params = _cast_params
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        leaves, self._treedef = jax.tree.flatten(params)
        self._shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        self._rest_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
        self.buckets = zero.plan_buckets(self._shapes, self.n, bucket_bytes)
        self._norm_reductions: list[tuple[tuple[str, ...], Any]] | None = None
        self._init_params = params
        self._init_rest = rest
        self._param_specs = [P()] * len(leaves)
        if self.layer_sharded:
            self._param_specs = [self._spec_of(x) for x in leaves]
            self._check_layer_sharding()
        else:
            _check_no_sharded_layers(model, strategy)
        self.step = jax.jit(self._step, donate_argnums=0)

    def _spec_of(self, x: jax.Array) -> P:
        """The PartitionSpec a parameter was built with (P() when it is not on the mesh)."""
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            if sharding.mesh.shape_tuple != self.mesh.shape_tuple:
                raise ValueError(
                    f"{_OWNER}(strategy={self.strategy!r}): a parameter lives on mesh "
                    f"{dict(sharding.mesh.shape)}, not on the trainer's mesh "
                    f"{dict(self.mesh.shape)}. Build the model and the Trainer on one mesh."
                )
            return sharding.spec
        return P()

    def _check_layer_sharding(self) -> None:
        """fsdp / fsdp+tp train parameters the layers split: some must be split."""

        def uses(spec: P, axis: str) -> bool:
            for entry in spec:
                if entry == axis or (isinstance(entry, tuple) and axis in entry):
                    return True
            return False

        wanted = [(self.fsdp_axis, "fsdp_axis")]
        if self.strategy == "fsdp+tp":
            wanted.append((self.tp_axis, "tp_axis"))
        for axis, argument in wanted:
            size = self.mesh.shape[axis]
            if size > 1 and not any(uses(s, axis) for s in self._param_specs):
                raise ValueError(
                    f"{_OWNER}(strategy={self.strategy!r}, {argument}={axis!r}): no parameter "
                    f"of the model is split over mesh axis {axis!r} (size {size}), so "
                    f"{self.strategy} would replicate them. Build the model from shardlax.nn "
                    f"layers on this mesh (they split their parameters over {axis!r}), or use "
                    f"strategy='zero2' for a model of replicated parameters."
                )

    # ------------------------------------------------------------------ layout
    @property
    def _split(self) -> str | tuple[str, ...] | None:
        """The PartitionSpec entry of the data axes (None when all have size 1)."""
        if not self.live:
            return None
        return self.live if len(self.live) > 1 else self.live[0]

    @property
    def sharded_state(self) -> bool:
        return self.strategy in ("zero1", "zero2")

    def _opt_specs(self) -> Any:
        if self.layer_sharded:
            # optimizer state that follows a parameter is split like it
            params = jax.tree.unflatten(self._treedef, self._shapes)
            return optax.tree_utils.tree_map_params(
                self.tx,
                lambda _, spec: spec,
                jax.eval_shape(self.tx.init, params),
                jax.tree.unflatten(self._treedef, self._param_specs),
                transform_non_params=lambda _: P(),
            )
        if not self.sharded_state:
            params = jax.tree.unflatten(self._treedef, self._shapes)
            return jax.tree.map(lambda _: P(), jax.eval_shape(self.tx.init, params))
        flat = jax.tree.unflatten(self._treedef, zero.flat_shard_shapes(self._shapes, self.n))
        return zero.sharded_state_specs(self.tx, flat, self._split)

    def state_specs(self) -> TrainState:
        """The PartitionSpec of every leaf of the `TrainState`."""
        master = None
        if self.mixed_precision is not None:
            master = jax.tree.unflatten(self._treedef, [P(self._split)] * len(self._shapes))
        return TrainState(
            params=jax.tree.unflatten(self._treedef, self._param_specs),
            opt_state=self._opt_specs(),
            rest=jax.tree.map(lambda _: P(), self._rest_shapes),
            step=P(),
            master=master,
        )

    def _gather_dtype(self, stored: Any) -> Any:
        """The dtype the replicated parameters are kept, computed with and gathered in."""
        policy = self.mixed_precision
        return jnp.dtype(stored) if policy is None else policy.gather_dtype(stored)

    def _reduce_dtype(self, stored: Any) -> Any:
        """The dtype the gradients are reduced (and the optimizer runs) in."""
        policy = self.mixed_precision
        return jnp.dtype(stored) if policy is None else policy.grad_reduce_dtype(stored)

    def init(self) -> TrainState:
        """The first `TrainState`: the model's parameters, placed, and `tx.init` of them.

        Under zero1/zero2 the optimizer state is initialised on the flat,
        zero-padded parameters and split over the data axes (1/N per device).
        """
        specs = self.state_specs()
        n = self.n

        def make(params, rest):
            master = None
            if self.sharded_state:
                leaves = jax.tree.leaves(params)
                flat = [jnp.pad(jnp.ravel(x), (0, s.shape[0] - x.size)) for x, s in
                        zip(leaves, zero.flat_shard_shapes(leaves, n), strict=True)]  # fmt: skip
                flat = jax.tree.unflatten(self._treedef, flat)
                opt = self.tx.init(flat)
                if self.mixed_precision is not None:
                    master = flat
                    params = jax.tree.map(lambda x: x.astype(self._gather_dtype(x.dtype)), params)
            else:
                opt = self.tx.init(params)
            return TrainState(params, opt, rest, jnp.zeros((), jnp.int32), master)

        shardings = jax.tree.map(
            lambda s: jax.sharding.NamedSharding(self.mesh, s),
            specs,
            is_leaf=lambda x: isinstance(x, P),
        )
        return jax.jit(make, out_shardings=shardings)(self._init_params, self._init_rest)

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model holding the parameters of `state` (the master copy, if any)."""
        return nnx.merge(self.graphdef, self.full_params(state), state.rest)

    def full_params(self, state: TrainState) -> Any:
        """The parameters in their stored dtype and shape: `state.params`, or the
        f32 master shards of a mixed-precision step unflattened (padding cut off)."""
        if state.master is None:
            return state.params

        def unflatten(master):
            return jax.tree.unflatten(
                self._treedef,
                [jnp.reshape(place(m, self.mesh, P())[: math.prod(s.shape)], s.shape)
                 for m, s in zip(jax.tree.leaves(master), self._shapes, strict=True)],
            )  # fmt: skip

        replicated = jax.sharding.NamedSharding(self.mesh, P())
        return jax.jit(unflatten, out_shardings=replicated)(state.master)

    # -------------------------------------------------------------- the step
    def _check_batch(self, batch: Any) -> int:
        leaves = jax.tree.leaves(batch)
        if not leaves:
            raise ValueError(f"{_OWNER}.step(batch={batch!r}): the batch has no arrays.")
        sizes = {x.shape[0] if x.ndim else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"{_OWNER}.step: every array of the batch needs the same leading (batch) dim, "
                f"got leading dims {sorted(map(str, sizes))}. Stack examples on axis 0."
            )
        b = sizes.pop()
        axes = self.data_axes
        if b % self.n:
            raise ValueError(
                f"{_OWNER}.step: the batch of {b} cannot be split over mesh axes {axes} "
                f"(size {self.n}): {self.n} does not divide {b}. Use a global batch divisible "
                f"by {self.n}."
            )
        local, k = b // self.n, self.accum_steps
        if local % k:
            raise ValueError(
                f"{_OWNER}(accum_steps={k}): the per-device batch of {local} (global batch "
                f"{b} over mesh axes {axes} of size {self.n}) cannot be split into {k} "
                f"micro-batches: {k} does not divide {local}. Choose accum_steps dividing "
                f"{local}, or a global batch divisible by {self.n * k}."
            )
        return b

    # --------------------------------------------------------- declarations
    def declared_collectives(
        self,
        batch: Any,
        *,
        model_collectives: Sequence[Declared] = (),
        loss_in_model: bool = False,
    ) -> list[Declared]:
        """The collectives one step compiles to, for a batch shaped like `batch`.

        Per step, N = size of the data axes, `P_b` = padded bytes of bucket b
        (`N * S_b * itemsize`), `n_b` = its unpadded bytes:

        - dp:    all-reduce `n_b` per bucket (the gradients, once).
        - zero1: all-reduce `P_b` per bucket, then all-gather `P_b` per bucket.
        - zero2: reduce-scatter `P_b` per bucket, then all-gather `P_b` per bucket.
        - fsdp, fsdp+tp: the model's own collectives, forward and backward, which
          only the model knows: pass them as `model_collectives` (the sum of its
          layers' `declared_collectives(..., grad=True)`).
        - all:   1 scalar all-reduce of the loss over the batch axes, and 1 scalar
          all-reduce per group of identically split leaves of every global norm
          that `tx` computes (zero1/zero2 with `clip_by_global_norm`: 1; dp: 0,
          its reduced gradients are replicated; fsdp+tp: one per distinct
          parameter spec). The norms are counted by tracing the step
          (`zero.record_norms`).

        Collectives over axes of size 1 are not declared (they do not compile).

        Args:
          batch: a batch (or `jax.ShapeDtypeStruct`s) shaped like the step's.
          model_collectives: fsdp / fsdp+tp: the model's declared collectives.
          loss_in_model: fsdp / fsdp+tp: `model_collectives` already include the
            loss's reduction over the batch (a model whose loss runs inside its
            own shard_map, such as `TinyLM.declared_collectives`), so it is not
            declared twice.
        """
        self._check_batch(batch)
        live = self.live
        if self._norm_reductions is None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
            jax.eval_shape(self._step, jax.eval_shape(self.init), abstract)

        def dt(b):
            return hlo_dtype(b.dtype)

        out = []
        if live and not (loss_in_model and self.layer_sharded):
            out.append(Declared("all-reduce", live, "f32", 1, 4, "loss: mean over the batch"))
        if self.layer_sharded:
            out += list(model_collectives)
        elif live and self.strategy == "dp":
            out += [Declared("all-reduce", live, dt(b), 1, b.bytes, "gradient bucket")
                    for b in self.buckets]  # fmt: skip
        elif live:
            kind = "reduce-scatter" if self.strategy == "zero2" else "all-reduce"
            for b in self.buckets:
                rdt, gdt = self._reduce_dtype(b.dtype), self._gather_dtype(b.dtype)
                rbytes = b.n * b.row * rdt.itemsize
                out.append(Declared(kind, live, hlo_dtype(rdt), 1, rbytes, "gradient bucket"))
                gname = gather_hlo_dtype(gdt)
                gbytes = b.n * b.row * gdt.itemsize
                out.append(Declared("all-gather", live, gname, 1, gbytes, "parameter bucket"))
        for axes, dtype in self._norm_reductions or ():
            item = jnp.dtype(dtype).itemsize
            out.append(Declared("all-reduce", axes, hlo_dtype(dtype), 1, item, "global norm"))
        return out

    def state_bytes(self) -> dict[str, int]:
        """Bytes per device of the parameters and the optimizer state (global / shard)."""
        state = jax.eval_shape(self.init)
        specs = self.state_specs()

        def local(x, s):
            shard = jax.sharding.NamedSharding(self.mesh, s).shard_shape(x.shape)
            return math.prod(shard) * jnp.dtype(x.dtype).itemsize

        def total(tree, spec_tree):
            return sum(
                jax.tree.leaves(
                    jax.tree.map(local, tree, spec_tree, is_leaf=lambda x: isinstance(x, P))
                )
            )

        out = {
            "params": total(state.params, specs.params),
            "opt_state": total(state.opt_state, specs.opt_state),
        }
        if state.master is not None:
            out["master"] = total(state.master, specs.master)
        return out


def _check_no_sharded_layers(model: nnx.Module, strategy: str) -> None:
    """dp/zero1/zero2 run the model inside their own shard_map: no shardlax.nn layer fits."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, ShardedLayer):
            where = ".".join(map(str, path)) or "the model itself"
            raise ValueError(
                f"{_OWNER}(strategy={strategy!r}): the model contains "
                f"shardlax.nn.{type(module).__name__} at {where!r}, whose own shard_map cannot "
                f"run inside the {strategy} step's shard_map. Use strategy='fsdp' (or "
                f"'fsdp+tp') for models of shardlax.nn layers: on a mesh with fsdp=1 and "
                f"model=1 that is plain data parallelism. Use flax.nnx layers for {strategy}."
            )


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    **kwargs: Any,
) -> tuple[TrainState, Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]]:
    """`(state, step)` of a `Trainer(model, tx, loss_fn, **kwargs)`.

    Example:
      >>> state, step = make_train_step(model, optax.adamw(1e-3), loss_fn,
      ...                               mesh=mesh, strategy="zero2")  # doctest: +SKIP
      >>> for batch in batches:  # doctest: +SKIP
      ...     state, metrics = step(state, batch)
    """
    trainer = Trainer(model, tx, loss_fn, **kwargs)
    return trainer.init(), trainer.step


__all__ = ["STRATEGIES", "TrainState", "Trainer", "make_train_step"]
