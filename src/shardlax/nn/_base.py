"""What every shardlax layer shares: mesh lookup, sharded parameters, input layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import kernels
from shardlax._axes import BATCH_AXES
from shardlax.audit import Declared
from shardlax.mesh import axes_size, check_axis, live_axes, place, present_axes, resolve_mesh


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


class ShardedLayer(nnx.Module):
    """Mixin with the mesh, the axis names, and the checks every layer runs."""

    mesh: Mesh
    axis_name: str
    batch_axes: tuple[str, ...]

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

    def _check_inputs(self, inputs: jax.Array, features: int, argument: str) -> None:
        owner = type(self).__name__
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
        self, kind: str, axes: Sequence[str], dtype: Any, nbytes: int, why: str
    ) -> list[Declared]:
        """One declared collective, or none when every axis has size 1."""
        live = tuple(a for a in axes if self.mesh.shape[a] > 1)
        if not live:
            return []
        return [Declared(kind, live, _hlo_dtype(dtype), 1, int(nbytes), why)]

    def _replicated_for_grad(self, *params: jax.Array | None) -> list[jax.Array | None]:
        """Cast batch-replicated parameters to varying over the batch axes.

        Their gradients are then all-reduced over the batch axes in the
        parameter dtype (before any compute-dtype cast), once per parameter.
        """
        live = live_axes(self.mesh, self.batch_axes)
        return [None if p is None else kernels.ensure_varying(p, live) for p in params]


_HLO_NAMES = {
    "float32": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "float64": "f64",
    "int32": "s32",
    "int64": "s64",
    "int8": "s8",
    "uint8": "u8",
    "bool": "pred",
}


def _hlo_dtype(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    return _HLO_NAMES.get(name, name)
