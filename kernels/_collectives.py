"""The collectives of shardlax, each a thin named wrapper over `jax.lax`.

Every collective call of the project goes through this file (or another file
in `kernels/`). Kernels and strategies call these names, never `jax.lax`
collectives directly, so that `grep` over `kernels/` finds every byte that
moves. All functions run *inside* `jax.shard_map` on per-device shards and
take mesh axis names.

Under `check_vma=True` (the shard_map default) JAX tracks, for each value,
the mesh axes over which it *varies* between devices. The transposes used by
autodiff follow from that type:

| forward                               | backward (transpose)             |
| ------------------------------------- | -------------------------------- |
| implicit cast invariant -> varying    | psum (all-reduce)                |
| `all_reduce` (psum)                   | none (cotangent is invariant)    |
| `all_gather(tiled=True)`              | `reduce_scatter(tiled=True)`     |
| `reduce_scatter(tiled=True)`          | `all_gather(tiled=True)`         |
| `ppermute(perm)`                      | `ppermute(inverse perm)`         |
| `all_to_all(split, concat)`           | `all_to_all(concat, split)`      |

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053).
  JAX shard_map notebook: docs/notebooks/shard_map.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisNames = str | Sequence[str]


def _as_tuple(axes: AxisNames) -> tuple[str, ...]:
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _live(x: jax.Array, axes: AxisNames) -> tuple[str, ...]:
    """`axes` minus those of size 1 that `x` does not vary over.

    A collective over a size-1 axis moves nothing but still compiles to an
    HLO op (XLA keeps a size-1 all-reduce); dropping those axes keeps the
    compiled program at its minimum. An axis `x` varies over is kept, so the
    vma type of the result stays what the caller asked for.
    """
    vary = varying_axes(x)
    return tuple(a for a in _as_tuple(axes) if lax.axis_size(a) > 1 or a in vary)


def varying_axes(x: jax.Array) -> frozenset[str]:
    """The mesh axes over which `x` varies (its vma type), inside shard_map."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def ensure_varying(x: jax.Array, axes: AxisNames) -> jax.Array:
    """Cast `x` to varying over `axes` (no data moves; `pcast(to='varying')`).

    Casting only the axes not already varying. Its transpose is an all-reduce
    over the cast axes, which is how a gradient of a replicated value is
    reduced. Use it to *choose* where that reduction happens, e.g. ZeRO-2
    casts replicated weights before `grad` so the reduction becomes a
    reduce-scatter instead of an all-reduce.
    """
    missing = tuple(a for a in _as_tuple(axes) if a not in varying_axes(x))
    if not missing:
        return x
    return lax.pcast(x, missing, to="varying")


def all_reduce(x: jax.Array, axes: AxisNames) -> jax.Array:
    """Sum over `axes` (psum). Forward: 1 all-reduce. Backward: none."""
    axes = _live(x, axes)
    if not axes:
        return x
    return lax.psum(x, axes)


def all_reduce_max(x: jax.Array, axes: AxisNames) -> jax.Array:
    """Max over `axes` (pmax). Not differentiable; use on stop_gradient values."""
    axes = _live(x, axes)
    if not axes:
        return x
    return lax.pmax(x, axes)


def all_gather(
    x: jax.Array, axes: AxisNames, *, axis: int = 0, invariant: bool = True
) -> jax.Array:
    """Concatenate the shards of `x` along `axis` over `axes` (tiled all-gather).

    Forward: 1 all-gather. Backward: 1 reduce-scatter (tiled psum_scatter).
    `invariant=True` types the result as the same on every device of `axes`
    (`to='invarying'`), which is what the gathered value is.
    """
    axes = _live(x, axes)
    if not axes:
        return x
    x = ensure_varying(x, axes)
    return lax.all_gather(
        x, axes, axis=axis, tiled=True, to="invarying" if invariant else "varying"
    )


def gather_bits_dtype(dtype) -> jnp.dtype | None:
    """The unsigned int a sub-32-bit float is all-gathered as; None for other dtypes."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return None
    return jnp.dtype({1: jnp.uint8, 2: jnp.uint16}[dtype.itemsize])


def gather_bits(
    x: jax.Array, axes: AxisNames, *, axis: int = 0, invariant: bool = True
) -> jax.Array:
    """`all_gather`, moving a 16/8-bit float as the raw bits of its width.

    XLA:CPU rewrites a bf16 all-gather into an f32 one (twice the bytes);
    gathering the bits (`bitcast_convert_type`) is bit-identical and no
    backend widens it. Not differentiable (bitcasts have no transpose): used
    in hand-written backwards and in ZeRO's parameter all-gather.
    Forward: 1 all-gather (u16 / u8 for 16- / 8-bit floats).
    """
    bits = gather_bits_dtype(x.dtype)
    if bits is None:
        return all_gather(x, axes, axis=axis, invariant=invariant)
    raw = all_gather(lax.bitcast_convert_type(x, bits), axes, axis=axis, invariant=invariant)
    return lax.bitcast_convert_type(raw, x.dtype)


def reduce_scatter(x: jax.Array, axes: AxisNames, *, axis: int = 0) -> jax.Array:
    """Sum over `axes` and keep this device's slice of `axis` (tiled psum_scatter).

    Forward: 1 reduce-scatter. Backward: 1 all-gather.
    """
    axes = _live(x, axes)
    if not axes:
        return x
    x = ensure_varying(x, axes)
    return lax.psum_scatter(x, axes, scatter_dimension=axis, tiled=True)


def ppermute(x: jax.Array, axis: str, perm: Sequence[tuple[int, int]]) -> jax.Array:
    """Send shards along `axis` by the (source, destination) pairs `perm`.

    Forward: 1 collective-permute. Backward: 1 collective-permute (inverse).
    """
    x = ensure_varying(x, axis)
    return lax.ppermute(x, axis, perm=list(perm))


def ring_shift(x: jax.Array, axis: str, axis_size: int, *, shift: int = 1) -> jax.Array:
    """Send each shard to the device `shift` steps further along `axis` (a ring)."""
    perm = [(i, (i + shift) % axis_size) for i in range(axis_size)]
    return ppermute(x, axis, perm)


def all_to_all(x: jax.Array, axis: str, *, split_axis: int, concat_axis: int) -> jax.Array:
    """Split `split_axis` into N pieces, send piece i to device i, concat on `concat_axis`.

    Forward: 1 all-to-all. Backward: 1 all-to-all (split and concat swapped).
    """
    x = ensure_varying(x, axis)
    return lax.all_to_all(x, axis, split_axis, concat_axis, tiled=True)


def axis_index(axes: AxisNames) -> jax.Array:
    """This device's row-major position over `axes` (not a collective)."""
    axes = _as_tuple(axes)
    return lax.axis_index(axes if len(axes) > 1 else axes[0])


def axis_size(axes: AxisNames) -> int:
    """The number of devices over `axes` (static)."""
    n = 1
    for a in _as_tuple(axes):
        n *= lax.axis_size(a)
    return n
