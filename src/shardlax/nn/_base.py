"""What every shardlax layer shares: mesh lookup, sharded parameters, input layout.

The FSDP half of a layer is `LayerFSDP` (`_fsdp_layer.py`, with the how-to of
adopting it); loading and call recording are in `_placing.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax._axes import BATCH_AXES
from shardlax.declarations import Declared, hlo_dtype
from shardlax.kernels._remat import call_site_of_shard_map
from shardlax.mesh import (
    axes_size,
    check_axis,
    is_manual,
    live_axes,
    place,
    present_axes,
    resolve_mesh,
)
from shardlax.nn._fsdp_layer import AUTO, LayerFSDP
from shardlax.nn._placing import _explicit, _laid_out, _placing, _spec_entries, _to_spec, _type_spec


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


__all__ = ["AUTO", "ShardedLayer", "nbytes", "param_value", "run_shard_map", "sharded_param"]

#: The forward methods at whose entry a layer places loaded parameters (`place_params`).
FORWARD_METHODS = ("__call__", "attend")


class ShardedLayer(LayerFSDP, nnx.Module):
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

    def _shard_map(self, body: Callable, args: tuple, in_specs: tuple, out_specs: Any) -> Any:
        """`jax.shard_map(body)` over `args` on this layer's mesh (see `run_shard_map`)."""
        return run_shard_map(body, self.mesh, args, in_specs, out_specs)


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

    with call_site_of_shard_map():  # the body learns if it runs under a checkpoint
        return jax.shard_map(
            wrapped,
            mesh=mesh,
            in_specs=tuple(in_specs[i] for i in present),
            out_specs=out_specs,
        )(*(args[i] for i in present))


def nbytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of an array of `shape` and `dtype` (for declared collectives)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize
