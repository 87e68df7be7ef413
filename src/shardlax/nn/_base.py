"""What every shardlax layer shares: mesh lookup, sharded parameters, input layout, FSDP.

FSDP (ZeRO-3) in a layer: the `fsdp_axis` (default ``'fsdp'`` when the mesh
has it and the batch is split over it) splits one more dim of each parameter,
so each device stores 1/N of it; the layer all-gathers it inside its
`shard_map` just before use and its gradient leaves reduce-scattered. How a
new layer adopts it (ColumnParallelLinear is the worked example):
  1. `__init__`: call `self._setup_mesh(...)` then `self._setup_fsdp(fsdp_axis,
     reshard_after_forward, mixed_precision)`.
  2. For each parameter, `spec = self._fsdp_spec(tp_spec, shape, dim, "arg")`
     (adds the fsdp axis on `dim`, after any model axis there; checks
     divisibility with a clear error) and build it with
     `sharded_param(..., spec)`; remember `dim` (choose a dim the model axis
     does not split when there is one: [D, F] column kernel -> dim 0).
  3. In the shard_map body, write the math as `use(params, x)` on whole
     parameters and return `self._fsdp_apply(use, (w_shard, b_shard), dims, x)`
     (instead of `self._replicated_for_grad`); compute in
     `self._compute_dtype()`. With `reshard_after_forward` the gathered
     parameters are freed after the forward and re-gathered in the backward.
  4. Run the body with `self._shard_map(body, args, in_specs, out_spec)`
     (it drops `None` args such as a missing bias).
  5. In `declared_collectives`, add `self._declare_fsdp(shape, dim, ...)` per
     parameter (all-gather forward, reduce-scatter + data all-reduce backward).
Biases and other 1-D parameters are split over the fsdp axis too (on their
only dim, after any model-axis split), so every parameter's per-device bytes
are total/N.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import BATCH_AXES, FSDP
from shardlax.declarations import Declared, Role, hlo_dtype
from shardlax.mesh import (
    axes_size,
    check_axis,
    is_manual,
    live_axes,
    place,
    present_axes,
    resolve_mesh,
)
from shardlax.placement import storage_spec
from shardlax.precision import MixedPrecision

#: `fsdp_axis` default: ``'fsdp'`` when the mesh has it and the batch is split
#: over it, else no FSDP.
AUTO = "auto"


def sharded_param(
    init: Callable[..., jax.Array],
    key: jax.Array,
    shape: tuple[int, ...],
    dtype: Any,
    mesh: Mesh,
    spec: P,
) -> nnx.Param:
    """`nnx.Param(init(key, shape, dtype))` laid out as `spec` on `mesh`.

    The value is computed exactly as flax computes it (same initializer, same
    key, same shape), so a shardlax layer starts from the same numbers as the
    flax layer it replaces; only its placement differs.
    """
    value = init(key, shape, dtype)
    value = jax.device_put(value, NamedSharding(mesh, spec))
    return nnx.Param(value, out_sharding=spec, mesh=mesh)


def param_value(p: nnx.Param | None) -> jax.Array | None:
    return None if p is None else p[...]


#: The forward methods at whose entry a layer places loaded parameters (`place_params`).
FORWARD_METHODS = ("__call__", "attend")


class ShardedLayer(nnx.Module):
    """Mixin with the mesh, the axis names, and the checks every layer runs.

    Every forward method (`FORWARD_METHODS`) of a subclass first runs
    `place_params`, so weights loaded the ordinary way (`param.set_value(
    numpy_array)`, `nnx.update(model, host_state)`, `param[...] = x`) are laid
    out as the layer stores them before its `shard_map` sees them.
    """

    mesh: Mesh
    axis_name: str
    batch_axes: tuple[str, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in FORWARD_METHODS:
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_places_params", False):
                setattr(cls, name, _placing(fn))

    def place_params(self) -> None:
        """Lay every parameter of this layer out as its spec says (`<name>_spec`).

        Eager: a parameter whose value is not an array laid out as its spec on
        this layer's mesh (a host `numpy` array, an unsharded or single-device
        `jax.Array`, another layout) is moved there with one explicit
        `jax.device_put` and stored back, so it moves once. Traced (under
        `jit`): nothing is stored; a value that arrives unsharded is
        constrained to the spec at the layer's `shard_map` (`run_shard_map`:
        a local slice forward; its gradient then leaves gathered back to the
        unsharded layout, one all-gather per parameter, because jit returns a
        gradient in its parameter's layout; place the weights before the jitted
        call to avoid it), and a value laid out with *other* mesh axes is a
        ValueError naming the parameter and the fix (resharding it would be a
        collective the layer does not declare). A no-op in manual mode (inside
        the Trainer's step every value is already a local shard), and for a
        layer inside a `fully_shard` unit (the unit stores and places its
        parameters).
        """
        if is_manual(self.mesh) or getattr(self, "in_fsdp_unit", False):
            return
        for name, var in list(vars(self).items()):
            if not isinstance(var, nnx.Param):
                continue
            spec = getattr(self, f"{name}_spec", None)
            if not isinstance(spec, P):
                continue
            value = var.get_value()
            if isinstance(value, jax.core.Tracer):
                self._check_traced_param(name, value, spec)
            elif not _laid_out(value, self.mesh, spec):
                var.set_value(jax.device_put(value, NamedSharding(self.mesh, spec)))

    def _check_traced_param(self, name: str, value: jax.Array, spec: P) -> None:
        if not _explicit(self.mesh):
            return  # Auto mesh: shard_map takes any layout (GSPMD moves it, as for any input)
        have = _spec_entries(_type_spec(value), value.ndim, self.mesh)
        want = _spec_entries(spec, value.ndim, self.mesh)
        if have == want or not any(have):
            return  # as stored, or unsharded: `run_shard_map` constrains it to `spec`
        owner = type(self).__name__
        sizes = {a: self.mesh.shape[a] for e in have for a in e}
        raise ValueError(
            f"{owner}: parameter {name!r} ({value.dtype}{list(value.shape)}) arrives under jit "
            f"laid out as {P(*have)} over mesh axes {sizes}, but the layer stores it as "
            f"{spec}; resharding it inside the jitted program would run collectives the layer "
            f"does not declare. Place it before the jitted call: layer.{name}.set_value("
            f"jax.device_put(layer.{name}[...], NamedSharding(mesh, {spec}))), or call "
            f"shardlax.nn.place_params(model) once outside jit."
        )

    def _setup_mesh(
        self, mesh: Mesh | None, axis_name: str, batch_axes: Sequence[str] | str | None
    ) -> None:
        owner = type(self).__name__
        self.mesh = resolve_mesh(mesh, owner)
        self.axis_name = axis_name
        self.model_size = check_axis(self.mesh, axis_name, owner, "axis_name")
        if batch_axes is None:
            # default: whichever of ('data', 'fsdp') the mesh has
            self.batch_axes = present_axes(self.mesh, BATCH_AXES)
        else:
            if isinstance(batch_axes, str):
                batch_axes = (batch_axes,)
            for a in batch_axes:
                check_axis(self.mesh, a, owner, "batch_axes")
            self.batch_axes = tuple(batch_axes)
        if axis_name in self.batch_axes:
            raise ValueError(
                f"{owner}(axis_name={axis_name!r}, batch_axes={self.batch_axes}): the "
                f"tensor-parallel axis cannot also split the batch. Remove {axis_name!r} "
                f"from batch_axes."
            )

    @property
    def batch_size_divisor(self) -> int:
        return axes_size(self.mesh, self.batch_axes)

    def _spec_axis(self, axis: str | None) -> str | None:
        """`axis` for a PartitionSpec entry, or None when it has size 1 (see `live_axes`)."""
        return axis if axis is not None and live_axes(self.mesh, (axis,)) else None

    def _batch_entry(self) -> str | tuple[str, ...] | None:
        live = live_axes(self.mesh, self.batch_axes)
        if not live:
            return None
        return live if len(live) > 1 else live[0]

    def _activation_spec(self, ndim: int, last: str | None) -> P:
        """`P(batch, None, ..., last)` for an activation of rank `ndim`."""
        last = self._spec_axis(last)
        if ndim == 1:
            return P(last)
        return P(self._batch_entry(), *([None] * (ndim - 2)), last)

    def _global_view(self, inputs: Any) -> Any:
        """What a shape check should look at: `inputs`, or in manual mode its global shape.

        In manual mode (`shardlax.mesh.is_manual`, the Trainer's step) a layer
        receives the local shard of its input; its global shape is the local
        one times the sizes of the axes of the layer's input spec
        (`input_spec` / `hidden_spec`) on each dim.
        """
        if not hasattr(inputs, "shape") or not is_manual(self.mesh):
            return inputs
        spec_fn = getattr(self, "input_spec", None) or getattr(self, "hidden_spec", None)
        if spec_fn is None or inputs.ndim < 1:
            return inputs
        spec = list(spec_fn(inputs.ndim))
        spec += [None] * (inputs.ndim - len(spec))
        shape = []
        for d, entry in zip(inputs.shape, spec, strict=True):
            axes = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
            shape.append(d * axes_size(self.mesh, axes))
        return jax.ShapeDtypeStruct(tuple(shape), inputs.dtype)

    def _check_inputs(self, inputs: jax.Array, features: int, argument: str) -> None:
        owner = type(self).__name__
        inputs = self._global_view(inputs)
        if not hasattr(inputs, "shape") or not hasattr(inputs, "dtype"):
            raise TypeError(
                f"{owner}: inputs must be an array, got {type(inputs).__name__}. "
                f"Pass a jax.Array of shape [..., {features}]."
            )
        if inputs.ndim < 1 or inputs.shape[-1] != features:
            raise ValueError(
                f"{owner}({argument}={features}): inputs.shape[-1] is "
                f"{inputs.shape[-1] if inputs.ndim else None}, expected {features} "
                f"(inputs.shape={tuple(inputs.shape)}). Pass inputs whose last dim is "
                f"{features}, or build the layer with {argument}="
                f"{inputs.shape[-1] if inputs.ndim else '...'}."
            )
        if inputs.ndim > 1:
            n = self.batch_size_divisor
            b = inputs.shape[0]
            if b % n:
                axes = self.batch_axes
                raise ValueError(
                    f"{owner}: inputs.shape[0]={b} (the batch) cannot be sharded over mesh "
                    f"axes {axes} (size {n}): {n} does not divide {b}. Use a batch size "
                    f"divisible by {n}, or a mesh whose {axes} size divides {b}."
                )

    def _place(self, x: jax.Array, spec: P) -> jax.Array:
        """Lay `x` out as `spec` (a no-op when it already is)."""
        return place(x, self.mesh, spec)

    def _local_batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if len(shape) > 1:
            return (shape[0] // self.batch_size_divisor, *shape[1:])
        return shape

    def _declare(
        self, kind: str, axes: Sequence[str], dtype: Any, nbytes: int, why: str, **fields: Any
    ) -> list[Declared]:
        """One declared collective, or none when every axis has size 1.

        `fields`: the structured record (`role`, `phase`, `module`, `param`,
        `tag` of `shardlax.declarations.Declared`); `why` is display text only.
        """
        live = tuple(a for a in axes if self.mesh.shape[a] > 1)
        if not live:
            return []
        return [Declared(kind, live, hlo_dtype(dtype), 1, int(nbytes), why, **fields)]

    # ----------------------------------------------------------------- FSDP

    def _setup_fsdp(
        self,
        fsdp_axis: str | None,
        reshard_after_forward: bool = True,
        mixed_precision: MixedPrecision | None = None,
    ) -> None:
        """Choose and validate the fsdp axis; call after `_setup_mesh`."""
        owner = type(self).__name__
        if fsdp_axis == AUTO:
            fsdp_axis = FSDP if FSDP in self.batch_axes else None
        if fsdp_axis is not None:
            if not isinstance(fsdp_axis, str):
                raise TypeError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}): expected a mesh axis name or None. "
                    f"Pass fsdp_axis='fsdp', or None to keep the parameters whole."
                )
            check_axis(self.mesh, fsdp_axis, owner, "fsdp_axis")
            if fsdp_axis == self.axis_name:
                raise ValueError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}, axis_name={self.axis_name!r}): the "
                    f"fsdp axis splits the batch and the tensor-parallel axis does not, so "
                    f"they cannot be the same axis. Pass fsdp_axis='fsdp' on a mesh from "
                    f"shardlax.make_mesh(fsdp=...)."
                )
            if fsdp_axis not in self.batch_axes:
                raise ValueError(
                    f"{owner}(fsdp_axis={fsdp_axis!r}, batch_axes={self.batch_axes}): the batch "
                    f"must be split over the fsdp axis (mesh axis {fsdp_axis!r}, size "
                    f"{self.mesh.shape[fsdp_axis]}), or every device of it would compute the "
                    f"same gradient and the reduce-scatter would count it "
                    f"{self.mesh.shape[fsdp_axis]} times. Add {fsdp_axis!r} to batch_axes, "
                    f"or pass fsdp_axis=None."
                )
        if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
            raise TypeError(
                f"{owner}(mixed_precision={mixed_precision!r}): expected a "
                f"shardlax.precision.MixedPrecision or None, got "
                f"{type(mixed_precision).__name__}. Pass "
                f"MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)."
            )
        self.fsdp_axis = fsdp_axis
        self.fsdp_size = 1 if fsdp_axis is None else self.mesh.shape[fsdp_axis]
        self.reshard_after_forward = bool(reshard_after_forward)
        self.mixed_precision = mixed_precision

    @property
    def _fsdp_live(self) -> bool:
        """Parameters are split over a fsdp axis of size > 1."""
        return self.fsdp_axis is not None and self.fsdp_size > 1

    def _fsdp_spec(self, spec: P, shape: Sequence[int], dim: int, argument: str) -> P:
        """`spec` with the fsdp axis added on `dim` (after any axes already there).

        `P(None, 'model')` on dim 0 gives `P('fsdp', 'model')`; `P('model')` on
        dim 0 gives `P(('model', 'fsdp'))`, whose fsdp-gather is the model
        shard. Raises if `shape[dim]` is not divisible by the product of sizes.
        """
        if not self._fsdp_live:
            return spec
        out = storage_spec(len(shape), [(dim, self.fsdp_axis)], spec)
        entry = out[dim]
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        size = axes_size(self.mesh, axes)
        if shape[dim] % size:
            owner = type(self).__name__
            rest = shape[dim] // max(1, size // self.fsdp_size)
            raise ValueError(
                f"{owner}({argument}={shape[dim]}) cannot be sharded over mesh axes {axes} "
                f"(size {size}) for FSDP: {size} does not divide {shape[dim]} (parameter "
                f"shape {tuple(shape)}, dim {dim}). Choose {argument} divisible by {size}, "
                f"or a mesh whose {self.fsdp_axis!r} axis divides {rest}, "
                f"or pass fsdp_axis=None to keep this layer's parameters whole."
            )
        return out

    def _compute_dtype(self) -> Any:
        """The dtype the layer computes in: its `dtype`, else the policy's `param_dtype`."""
        dtype = getattr(self, "dtype", None)
        if dtype is None and self.mixed_precision is not None:
            return self.mixed_precision.param_dtype
        return dtype

    def _gather(
        self, shard: jax.Array | None, dim: int, token_axes: Sequence[str] = ()
    ) -> jax.Array | None:
        """Inside the shard_map body: the whole (over fsdp) parameter, ready for use.

        FSDP: one tiled all-gather over the fsdp axis (its gradient is one
        reduce-scatter, then an all-reduce of the shard over the other batch
        axes), in the policy's `param_dtype` when a `mixed_precision` is set.
        Without FSDP: the parameter cast to varying over the batch axes (its
        gradient is all-reduced over them), as `_replicated_for_grad`.

        `token_axes`: further axes the tokens this parameter meets are split
        over (the model axis for a bias added after a sequence-parallel
        reduce-scatter); its gradient is summed over them too, in the same
        all-reduce as the other batch axes.
        """
        if shard is None:
            return None
        live = live_axes(self.mesh, (*self.batch_axes, *token_axes))
        policy = self.mixed_precision
        if not self._fsdp_live:
            shard = kernels.ensure_varying(shard, live)
            return shard if policy is None else shard.astype(policy.gather_dtype(shard.dtype))
        stored = shard.dtype
        return kernels.fsdp_gather(
            shard,
            self.fsdp_axis,
            dim=dim,
            replicated_axes=tuple(a for a in live if a != self.fsdp_axis),
            gather_dtype=None if policy is None else policy.gather_dtype(stored),
            reduce_dtype=None if policy is None else policy.grad_reduce_dtype(stored),
        )

    def _fsdp_apply(
        self,
        fn: Callable[[Any, Any], Any],
        shards: tuple,
        dims: tuple[int, ...],
        args: Any,
        token_axes: tuple[tuple[str, ...], ...] | None = None,
    ) -> Any:
        """Inside the shard_map body: `fn(params, args)` with `params` gathered.

        `shards` are the parameters as the body receives them (`None` for an
        absent one), `dims` the dim each is split on over the fsdp axis,
        `token_axes` (default none) the extra axes each one's gradient is
        summed over (see `_gather`). With FSDP and `reshard_after_forward`,
        `kernels.fsdp_call` frees the gathered parameters after the forward
        and re-gathers them in the backward; otherwise plain autodiff keeps them.
        """
        extra = ((),) * len(dims) if token_axes is None else token_axes

        def gather(ps):
            return tuple(self._gather(p, d, t) for p, d, t in zip(ps, dims, extra, strict=True))

        if not self._fsdp_live:  # nothing gathered: plain autodiff of the replicated params
            return fn(gather(tuple(shards)), args)
        return kernels.fsdp_call(
            fn,
            tuple(shards),
            args,
            gather=gather,
            reshard_after_forward=self.reshard_after_forward,
        )

    def _shard_map(self, body: Callable, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
        """`jax.shard_map(body)` over `args` on this layer's mesh (see `run_shard_map`)."""
        return run_shard_map(body, self.mesh, args, in_specs, out_specs)

    def _declare_fsdp(
        self, local_shape: Sequence[int], dim: int, *, grad: bool, regather: bool, why: str,
        token_axes: Sequence[str] = (),
    ) -> list[Declared]:  # fmt: skip
        """The FSDP collectives of one parameter whose model-local shape is `local_shape`.

        Forward: 1 all-gather over the fsdp axis of the gathered bytes (in the
        gather dtype). Backward (`grad`): 1 reduce-scatter over the fsdp axis
        (reduce dtype) and 1 all-reduce of the shard over the other batch axes;
        plus 1 all-gather when `regather` (reshard_after_forward and the
        backward needs the parameter's value). Without FSDP: the all-reduce of
        the whole local parameter over the batch axes. `token_axes` join the
        batch axes of the all-reduce (see `_gather`).
        """
        stored = self.param_dtype
        policy = self.mixed_precision
        gdt = stored if policy is None else policy.gather_dtype(stored)
        rdt = stored if policy is None else policy.grad_reduce_dtype(stored)
        n = 1
        for d in local_shape:
            n *= int(d)
        full = n * jnp.dtype(gdt).itemsize
        if not self._fsdp_live:
            if not grad:
                return []
            nbytes = n * jnp.dtype(stored).itemsize
            axes = (*self.batch_axes, *token_axes)
            return self._declare("all-reduce", axes, stored, nbytes, f"d{why}",
                                 role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        gname = gather_hlo_dtype(gdt)
        out = self._declare_as("all-gather", (self.fsdp_axis,), gname, full, f"gather {why}",
                               role=Role.PARAM_GATHER, param=why)  # fmt: skip
        if not grad:
            return out
        if regather:
            out += self._declare_as("all-gather", (self.fsdp_axis,), gname, full,
                                    f"re-gather {why} (reshard_after_forward)")  # fmt: skip
        out += self._declare("reduce-scatter", (self.fsdp_axis,), rdt,
                             n * jnp.dtype(rdt).itemsize, f"d{why} over fsdp",
                             role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        others = (*(a for a in self.batch_axes if a != self.fsdp_axis), *token_axes)
        shard_bytes = n // self.fsdp_size * jnp.dtype(rdt).itemsize
        out += self._declare("all-reduce", others, rdt, shard_bytes, f"d{why} shard",
                             role=Role.GRAD_REDUCE, param=why)  # fmt: skip
        return out

    def _declare_as(
        self, kind: str, axes: Sequence[str], hlo_dtype: str, nbytes: int, why: str,
        **fields: Any,
    ) -> list[Declared]:  # fmt: skip
        live = tuple(a for a in axes if self.mesh.shape[a] > 1)
        if not live:
            return []
        return [Declared(kind, live, hlo_dtype, 1, int(nbytes), why, **fields)]

    def _replicated_for_grad(self, *params: jax.Array | None) -> list[jax.Array | None]:
        """Cast batch-replicated parameters to varying over the batch axes.

        Their gradients are then all-reduced over the batch axes in the
        parameter dtype (before any compute-dtype cast), once per parameter.
        """
        live = live_axes(self.mesh, self.batch_axes)
        return [None if p is None else kernels.ensure_varying(p, live) for p in params]


def gather_hlo_dtype(dtype: Any) -> str:
    """The HLO dtype of an FSDP all-gather: 16/8-bit floats travel as their bits."""
    return hlo_dtype(kernels.gather_bits_dtype(dtype) or dtype)


def run_shard_map(body: Callable, mesh: Mesh, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
    """`jax.shard_map(body)` over `args`, dropping `None` arguments (a missing bias).

    `body` still receives every argument, `None` where one is missing, so a
    kernel can take `bias=None` while shard_map only sees arrays.
    """
    if is_manual(mesh):
        # Already inside a shard_map over every live axis of `mesh` (the Trainer's
        # step): the arguments are local shards in `in_specs` layout; run the
        # per-device body as it is.
        return body(*args)
    present = [i for i, a in enumerate(args) if a is not None]
    args = tuple(
        a if a is None else _to_spec(a, mesh, s) for a, s in zip(args, in_specs, strict=True)
    )

    @functools.wraps(body)
    def wrapped(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return body(*full)

    return jax.shard_map(
        wrapped,
        mesh=mesh,
        in_specs=tuple(in_specs[i] for i in present),
        out_specs=out_specs,
    )(*(args[i] for i in present))


def place_params(module: nnx.Module) -> nnx.Module:
    """Lay out every shardlax layer's parameters in `module` as the layer stores them.

    Call it once after loading weights the ordinary way (`nnx.update(model,
    host_state)`, `param.set_value(numpy_array)`), outside `jit`: each
    parameter not laid out as its spec is moved there by one explicit
    `jax.device_put` (see `ShardedLayer.place_params`). Layers do this by
    themselves when called eagerly; under `jit` they can only constrain the
    value for that program, so placing first keeps the compiled step as
    declared. Plain flax layers in `module` are left as they are. Returns
    `module`.
    """
    for _, node in nnx.iter_graph(module):
        if isinstance(node, ShardedLayer):
            node.place_params()
    return module


#: (layer, method, input, global input shape, input dtype, kwargs) of the outermost layer
#: calls traced under `recording_calls` (None: not recording).
_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("shardlax_calls", default=None)
_IN_LAYER: contextvars.ContextVar[bool] = contextvars.ContextVar("shardlax_in_layer", default=False)


@contextlib.contextmanager
def recording_calls() -> Iterator[list]:
    """Record the shardlax layer calls traced inside (not the inner layers of a composite).

    A `fully_shard` unit declares the collectives of the layers it runs from
    these (each layer's `declared_collectives` for the global shape it saw).
    """
    calls: list = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


def recorded_calls() -> list | None:
    """The list `recording_calls` is filling, or None."""
    return _CALLS.get()


def _placing(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def method(self, *args: Any, **kwargs: Any) -> Any:
        self.place_params()
        calls = _CALLS.get()
        if calls is None or _IN_LAYER.get():
            return fn(self, *args, **kwargs)
        x = args[0] if args else None
        shape = tuple(self._global_view(x).shape) if hasattr(x, "shape") else None
        calls.append((self, fn.__name__, x, shape, getattr(x, "dtype", None), dict(kwargs)))
        token = _IN_LAYER.set(True)
        try:
            return fn(self, *args, **kwargs)
        finally:
            _IN_LAYER.reset(token)

    method._places_params = True
    return method


def _explicit(mesh: Mesh) -> bool:
    return all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)


def _type_spec(x: Any) -> P:
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return P() if spec is None else spec


def _spec_entries(spec: P, ndim: int, mesh: Mesh) -> tuple[tuple[str, ...], ...]:
    """Per dim, the live mesh axes `spec` splits it over (size-1 axes split nothing)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    out = []
    for e in entries[:ndim]:
        axes = () if e is None else ((e,) if isinstance(e, str) else tuple(e))
        out.append(tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1))
    return tuple(out)


def _laid_out(x: Any, mesh: Mesh, spec: P) -> bool:
    sharding = getattr(x, "sharding", None)
    return (
        isinstance(x, jax.Array)
        and sharding is not None
        and sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
    )


def _to_spec(x: Any, mesh: Mesh, spec: P) -> Any:
    """`x` laid out as `spec` where it is not yet: a loaded (unsharded or host) value.

    Eager: one explicit `device_put` unless `x` already is laid out so (the
    layers' own activations and stored parameters: a no-op). Traced on an
    Explicit mesh: an unsharded value gets a sharding constraint to `spec`
    (a local slice); any other layout is left to shard_map's own check
    (parameters are checked, with their names, by `ShardedLayer.place_params`).
    """
    if not isinstance(spec, P) or not hasattr(x, "ndim"):
        return x  # a pytree argument with its own spec tree: left as the layer built it
    if isinstance(x, jax.core.Tracer):
        if (
            _explicit(mesh)
            and any(_spec_entries(spec, x.ndim, mesh))
            and not any(_spec_entries(_type_spec(x), x.ndim, mesh))
        ):
            return jax.device_put(x, NamedSharding(mesh, spec))
        return x
    if _laid_out(x, mesh, spec):
        return x
    return jax.device_put(x, NamedSharding(mesh, spec))


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of `shape` and `dtype` (for declared collectives)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize
