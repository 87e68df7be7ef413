"""One way to write a train step: `Trainer` / `make_train_step`.

A `Trainer` is built from an NNX model (any: plain flax layers, shardlax
layers, `fully_shard` units, a `parallelize`d model), any optax
transformation, a loss function and a mesh, and a *strategy*
(`shardlax.strategies`) that says how each parameter's gradient is summed
over the batch axes it is replicated over and where its optimizer state
lives:

| strategy    | gradients over the replicated batch axes | optimizer state   |
| ----------- | ---------------------------------------- | ----------------- |
| ``dp``      | all-reduced                              | like the params   |
| ``zero1``   | all-reduced, then sliced to 1/N          | 1/N per device    |
| ``zero2``   | reduce-scattered to 1/N                  | 1/N per device    |
| ``fsdp``    | reduce-scattered over fsdp (layers), all-reduced over data | like the params |
| ``fsdp+tp`` | as fsdp, with tensor-parallel layers     | like the params   |

Parameters the model splits itself (tensor-parallel layers over ``model``,
FSDP over ``fsdp``) stay split under every strategy: ZeRO-2 with tensor
parallelism is ``strategy="zero2"`` on a ``(data, model)`` mesh.

Every strategy runs the same step (see `shardlax._train_steps`): one
`shard_map` over the whole mesh, the model on each device's batch shard, one
collective per gradient bucket. The forward may update any `nnx.Variable`
(BatchNorm statistics, RNG counts, counters): the new values come back in
`TrainState.rest`, equal to one device (BatchNorm statistics are those of
the global batch, nnx.Dropout masks those one device draws).

`loss_fn(model, batch) -> scalar` must return the *mean* over the batch it
is given; the step's loss and gradients are those of the mean over the global
batch, so they equal single-device training on the whole batch.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardlax import placement, strategies, zero
from shardlax._axes import DATA, FSDP, MODEL
from shardlax._random_check import RandomChecked
from shardlax._train_declare import _Declarations
from shardlax._train_layout import _Layout
from shardlax._train_steps import TrainState, _Steps
from shardlax.mesh import axes_size, check_axis, live_axes, resolve_mesh
from shardlax.precision import MixedPrecision

#: The strategies `Trainer` implements (names of `shardlax.strategies`).
STRATEGIES = strategies.names()

_OWNER = "Trainer"


def _not_param(path, x) -> bool:
    return not isinstance(x, nnx.Param)


class Trainer(_Layout, _Declarations, _Steps):
    """Builds and runs the train step of one model under one parallelism strategy.

    Args:
      model: an NNX module; its `nnx.Param`s are trained, its other state is
        passed to the forward and updated by it (`TrainState.rest`).
      tx: any optax `GradientTransformation`. Under zero1/zero2 it runs on
        flat per-parameter shards: elementwise transforms are exact, and the
        global norm of `optax.clip_by_global_norm` is made exact by
        `optax_norm_hook` (see `shardlax.zero`).
      loss_fn: `loss_fn(model, batch) -> scalar`, the mean loss over `batch`
        (a pytree of arrays whose leading dim is the batch).
      mesh: the mesh; default the one set with `jax.set_mesh`.
      strategy: a name of `STRATEGIES` or a `shardlax.strategies.Strategy`.
      accum_steps: split each device's part of the batch into this many
        micro-batches, run them one after another (`lax.scan`) and sum their
        gradients locally; the cross-device reduction runs once per step.
      data_axis: the mesh axis (or axes) of pure data parallelism (default
        ``'data'``). The batch is split over these and the fsdp axis.
      fsdp_axis: the mesh axis FSDP layers split parameters over.
      tp_axis: the tensor-parallel mesh axis (never splits the batch).
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
      check_tensor_parallel: for a model `shardlax.parallelize` made
        tensor-parallel, the first `step` also computes the loss with the
        model's code on global arrays (the twins running their own
        shard_maps, as outside the Trainer) and raises a ValueError if it
        differs from the step's, where that code runs on per-device shards
        (a norm over split features, q heads paired with the wrong kv heads).
        One extra forward compile, once; False skips it (so does a model whose
        code cannot run at top level on this mesh).
      sync_batch_stats: `nnx.BatchNorm` layers normalise with the statistics
        of the global batch (one f32 all-reduce of `[2, F]` per call), as on
        one device (default True). False: per-device statistics, as DDP
        without SyncBatchNorm.
      per_device_random: the first step per batch shape refuses random
        numbers the model's own code draws (`jax.random.*` with a key every
        device holds) in a shape that follows the device's batch shard: they
        would repeat on every device (see `shardlax._random_check`). True
        accepts such draws (not equal to one device).

    Example:
      >>> import jax
      >>> jax.config.update("jax_num_cpu_devices", 8)  # simulated CPU devices (not on GPU/TPU)
      >>> import jax.numpy as jnp, optax, shardlax
      >>> from flax import nnx
      >>> mesh = shardlax.make_mesh(data=8)
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> loss_fn = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
      >>> trainer = shardlax.Trainer(model, tx, loss_fn, mesh=mesh, strategy="zero2")
      >>> state = trainer.init()
      >>> batch = {"x": jnp.ones((16, 4)), "y": jnp.zeros((16, 2))}
      >>> state, metrics = trainer.step(state, batch)
      >>> model = trainer.model(state)
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Any], jax.Array],
        *,
        mesh: Mesh | None = None,
        strategy: str | strategies.Strategy = "zero2",
        accum_steps: int = 1,
        data_axis: str | Sequence[str] = DATA,
        fsdp_axis: str = FSDP,
        tp_axis: str = MODEL,
        bucket_bytes: int | None = zero.DEFAULT_BUCKET_BYTES,
        optax_norm_hook: bool = True,
        mixed_precision: MixedPrecision | None = None,
        check_tensor_parallel: bool = True,
        sync_batch_stats: bool = True,
        state_reduction: str | None = None,
        per_device_random: bool = False,
        _cast_params: bool = True,
    ):
        self.strategy = strategies.get(strategy, _OWNER)
        tx = _as_transformation(tx)
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
        data_axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
        for a in data_axes:
            check_axis(self.mesh, a, _OWNER, "data_axis")
        self.fsdp_axis, self.tp_axis = fsdp_axis, tp_axis
        for argument in self.strategy.needs_axes:
            check_axis(self.mesh, getattr(self, argument), _OWNER, argument)
        if fsdp_axis in self.mesh.axis_names and fsdp_axis not in data_axes:
            data_axes = (*data_axes, fsdp_axis)  # the batch is split over fsdp too
        if tp_axis in data_axes:
            raise ValueError(
                f"{_OWNER}(data_axis={data_axis!r}, tp_axis={tp_axis!r}): the tensor-parallel "
                f"axis cannot also split the batch. Remove {tp_axis!r} from data_axis."
            )
        self.data_axes = data_axes
        self.live = live_axes(self.mesh, self.data_axes)
        self.n = axes_size(self.mesh, self.data_axes)
        self.tx = tx
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.optax_norm_hook = optax_norm_hook
        self.sync_batch_stats = bool(sync_batch_stats)
        if state_reduction not in (None, "mean"):
            raise ValueError(
                f"{_OWNER}(state_reduction={state_reduction!r}): expected None (a Variable the "
                f"forward sets from per-device data is an error) or 'mean' (average it over "
                f"the batch axes: exact for updates linear in batch means, such as a running "
                f"mean)."
            )
        self.state_reduction = state_reduction
        if mixed_precision is not None:
            if not isinstance(mixed_precision, MixedPrecision):
                raise TypeError(
                    f"{_OWNER}(mixed_precision={mixed_precision!r}): expected a "
                    f"shardlax.precision.MixedPrecision or None, got "
                    f"{type(mixed_precision).__name__}. Pass MixedPrecision("
                    f"param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
                )
            if not self.strategy.shard_state:
                raise ValueError(
                    f"{_OWNER}(strategy={self.strategy.name!r}, mixed_precision=...): the "
                    f"Trainer keeps f32 master shards only under zero1/zero2. Use "
                    f"strategy='zero2' (same gradient bytes as dp, 1/N of the state), or for "
                    f"fsdp give mixed_precision= to the shardlax.nn layers."
                )
        self.mixed_precision = mixed_precision
        self._cast_params = _cast_params
        self._rest_filter = _not_param
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        flat, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [x for _, x in flat]
        self.paths = [placement.path_str(p) for p, _ in flat]
        self._shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        self._rest_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)
        self.placements = placement.plan(
            self.paths, leaves, self.mesh, self.data_axes,
            shard_state=self.strategy.shard_state, owner=_OWNER, policy=mixed_precision,
        )  # fmt: skip
        self._rest_specs = jax.tree.map(
            lambda x: placement.spec_of(x, self.mesh, _OWNER, "state"), rest
        )
        from shardlax.fsdp import FSDPModule

        self._fsdp_units = sum(isinstance(m, FSDPModule) for _, m in nnx.iter_modules(model))
        self.strategy.validate(self)
        if self.strategy.shard_state:
            self._check_tx_on_flat_shards()
        else:
            self._check_tx_on_local_shards()
        self.bucket_groups = self._plan_buckets(bucket_bytes)
        self.buckets = tuple(b for bs in self.bucket_groups.values() for b in bs)
        self._norm_reductions: list[tuple[tuple[str, ...], Any]] | None = None
        self._loss_axes: tuple[str, ...] = ()
        self._state_reductions: list[tuple[tuple[str, ...], str, int, Any]] = []
        self._init_params = params
        self._init_rest = rest
        shardings = self._shardings(self.state_specs())
        self.step = jax.jit(
            self._step,
            donate_argnums=0,
            out_shardings=(shardings, {"loss": jax.sharding.NamedSharding(self.mesh, P())}),
        )
        if not per_device_random:
            self.step = RandomChecked(
                self.step, f"{_OWNER}(strategy={self.strategy.name!r})", self.n,
                f"{_OWNER}(per_device_random=True)",
            )  # fmt: skip
        from shardlax._tp_check import FirstStepChecked
        from shardlax._twins_local import planned_twins

        twins = planned_twins(model, tp_axis) if check_tensor_parallel else []
        if twins:
            self.step = FirstStepChecked(self.step, self, twins)

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model holding the parameters and other state of `state`."""
        return nnx.merge(self.graphdef, self.full_params(state), state.rest)

    # ---------------------------------------------------------- checkpoints
    def save(self, directory, state: TrainState, *, step: int | None = None,
             max_to_keep: int | None = None) -> None:  # fmt: skip
        """Start saving `state` (async; the logical layout of `shardlax.checkpoint`).

        Returns once the arrays are on the host: the next (donating) `step`
        is safe. `wait()` blocks until the files are written. `max_to_keep`
        default: `shardlax.checkpoint.DEFAULT_MAX_TO_KEEP`.
        """
        from shardlax import checkpoint

        keep = checkpoint.DEFAULT_MAX_TO_KEEP if max_to_keep is None else max_to_keep
        checkpoint.save(self, directory, state, step=step, max_to_keep=keep)

    def restore(self, directory, step: int | None = None) -> TrainState:
        """The state saved at `step` (default: the latest) by any strategy and mesh, laid out
        for this trainer (each device reads its own shards)."""
        from shardlax import checkpoint

        return checkpoint.restore(self, directory, step)

    def wait(self) -> None:
        """Block until every save this process started is written."""
        from shardlax import checkpoint

        checkpoint.wait()

    # -------------------------------------------------------------- the step
    def place_batch(self, batch: Any) -> Any:
        """`batch` laid out as `step` reads it: each array split on its leading dim over
        the batch axes (`NamedSharding(mesh, P(batch axes))`).

        `step` accepts host or one-device arrays too, but then every call first
        copies the whole batch out to the devices (for a small model that copy
        can cost as much as the step); place the next batch ahead, in the data
        loader, and `step` moves nothing at its inputs.
        """
        self._check_batch(batch)
        return jax.tree.map(lambda x: self._put(x, self._batch_spec(x)), batch)

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
        axes = self.live or self.data_axes
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


def _as_transformation(tx: Any) -> optax.GradientTransformation:
    """`tx` as a GradientTransformation (an `optax.MultiSteps` is accepted as users pass it)."""
    if isinstance(tx, optax.MultiSteps):
        return tx.gradient_transformation()
    if isinstance(tx, optax.GradientTransformation):
        return tx
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return optax.GradientTransformation(tx.init, tx.update)
    raise TypeError(
        f"{_OWNER}(tx={tx!r}): expected an optax.GradientTransformation, got "
        f"{type(tx).__name__}. Pass e.g. optax.adamw(1e-3)."
    )


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    **kwargs: Any,
) -> tuple[TrainState, Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]]:
    """`(state, step)` of a `Trainer(model, tx, loss_fn, **kwargs)`.

    Example:
      >>> import jax
      >>> jax.config.update("jax_num_cpu_devices", 8)  # simulated CPU devices (not on GPU/TPU)
      >>> import jax.numpy as jnp, optax, shardlax
      >>> from flax import nnx
      >>> mesh = shardlax.make_mesh(data=8)
      >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
      >>> loss_fn = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
      >>> state, step = shardlax.make_train_step(model, optax.adamw(1e-3), loss_fn,
      ...                                        mesh=mesh, strategy="zero2")
      >>> for _ in range(2):
      ...     state, metrics = step(state, {"x": jnp.ones((16, 4)), "y": jnp.zeros((16, 2))})
    """
    trainer = Trainer(model, tx, loss_fn, **kwargs)
    return trainer.init(), trainer.step


__all__ = ["STRATEGIES", "TrainState", "Trainer", "make_train_step"]
