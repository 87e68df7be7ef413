"""ZeRO-1/2 per-device kernels: flat gradient buckets, sharded updates, global norms.

ZeRO (Rajbhandari et al. 2020) keeps parameters replicated over the data
axes but splits the optimizer state (stage 1) and the reduced gradients
(stage 2) into 1/N per device. The kernels here do the per-device part of one
step, inside `jax.shard_map`, on flat *buckets* so that a step runs one
collective per bucket instead of one per parameter.

Bucket layout (N = size of the data axes, one bucket = several parameters of
one dtype). Each parameter `p` of `n_p` elements is flattened and zero-padded
to `N * S_p` elements, `S_p = ceil(n_p / N)`, and viewed as `[N, S_p]`: row
`i` is device i's shard of `p`. A bucket concatenates these views along
their columns:

    bucket: [N, S_b],  S_b = sum_p S_p,  bucket[i] = concat_p shard_i(p)

so one tiled reduce-scatter / all-gather over axis 0 of the bucket moves
every parameter's shard to (or from) its owner at once, and each device's
row splits back into its per-parameter shards `[S_p]`. The zero padding
removes the divisibility limit and never changes the math: padded gradient
entries are 0, so their optimizer updates and their share of any norm are 0,
and they are cut off when the full parameter is rebuilt.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", SC 2020 (arXiv:1910.02054), sections 5.1-5.2.
  Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
  Training", VLDB 2020 (arXiv:2006.15704): gradient bucketing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ._collectives import (
    AxisNames,
    _as_tuple,
    all_reduce,
    all_reduce_max,
    axis_index,
    axis_size,
    gather_bits,
    reduce_scatter,
    varying_axes,
)


def shard_size(numel: int, n: int) -> int:
    """Elements per device of a parameter of `numel` elements split N ways: ceil(numel / n)."""
    return -(-numel // n)


def _as_rows(x: jax.Array, n: int) -> jax.Array:
    """`x` flattened, zero-padded to `n * ceil(size / n)` and viewed as `[n, S]`."""
    s = shard_size(x.size, n)
    flat = jnp.ravel(x)  # flat: [numel]
    flat = jnp.pad(flat, (0, n * s - x.size))  # flat: [n * S]
    return jnp.reshape(flat, (n, s))  # rows: [n, S]


def pack_bucket(leaves: Sequence[jax.Array], n: int) -> jax.Array:
    """Concatenate the `[n, S_p]` row views of `leaves` into one bucket `[n, S_b]`.

    No collective. Every leaf must have the bucket's dtype.
    """
    return jnp.concatenate([_as_rows(x, n) for x in leaves], axis=1)  # bucket: [n, S_b]


def unpack_bucket(bucket: jax.Array, shapes: Sequence[tuple[int, ...]], n: int) -> list[jax.Array]:
    """Inverse of `pack_bucket` for a full bucket `[n, S_b]`: the leaves, padding cut off."""
    out, start = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        s = shard_size(numel, n)
        rows = bucket[:, start : start + s]  # rows: [n, S_p]
        out.append(jnp.reshape(jnp.ravel(rows)[:numel], shape))
        start += s
    return out


def split_row(row: jax.Array, shapes: Sequence[tuple[int, ...]], n: int) -> list[jax.Array]:
    """This device's row of a bucket, `[S_b]`, split into per-parameter shards `[S_p]`."""
    out, start = [], 0
    for shape in shapes:
        s = shard_size(math.prod(shape), n)
        out.append(row[start : start + s])
        start += s
    return out


def local_shard(x: jax.Array, axes: AxisNames) -> jax.Array:
    """This device's flat shard `[S]` of a replicated `x` (its row of `_as_rows`).

    No collective: each device slices the copy it already holds. The result
    varies over `axes`.
    """
    n = axis_size(axes)
    rows = _as_rows(x, n)  # rows: [N, S]
    return _my_row(rows, axes)  # [S]


def _my_row(rows: jax.Array, axes: AxisNames) -> jax.Array:
    """Row `axis_index(axes)` of `rows: [N, S]` (row 0 when `axes` is empty)."""
    if not _as_tuple(axes):
        return rows[0]
    return lax.dynamic_index_in_dim(rows, axis_index(axes), axis=0, keepdims=False)


def reduce_scatter_bucket(grads: Sequence[jax.Array], axes: AxisNames) -> list[jax.Array]:
    """ZeRO-2 gradient reduction: sum the per-device gradients and keep this device's shards.

    Math: with g^(d) the gradients of device d, device i returns, for every
    parameter p, `shard_i(sum_d g_p^(d))` (flat, zero-padded, `[S_p]`).

    Shardings (N = size of `axes`):
      grads:   the per-device (unreduced) gradients, full shapes, varying over `axes`
      returns: one `[S_p]` shard per parameter, varying over `axes`

    Collectives over `axes`: forward 1 reduce-scatter of the `[N, S_b]` bucket
    (every gradient byte once, plus padding). Backward: 1 all-gather.
    """
    n = axis_size(axes)
    bucket = pack_bucket(grads, n)  # bucket: [N, S_b]
    row = reduce_scatter(bucket, axes, axis=0)  # row: [1, S_b]
    return split_row(row[0], [g.shape for g in grads], n)


def all_reduce_then_shard_bucket(grads: Sequence[jax.Array], axes: AxisNames) -> list[jax.Array]:
    """ZeRO-1 gradient reduction: all-reduce the full gradients, then keep this device's shards.

    Same result as `reduce_scatter_bucket`; every device briefly holds the
    whole reduced gradient (the ZeRO-1 memory profile).

    Collectives over `axes`: forward 1 all-reduce of the `[N, S_b]` bucket.
    Backward: none.
    """
    n = axis_size(axes)
    bucket = pack_bucket(grads, n)  # bucket: [N, S_b]
    full = all_reduce(bucket, axes)  # full: [N, S_b], the same on every device
    row = _my_row(full, axes)  # row: [S_b]
    return split_row(row, [g.shape for g in grads], n)


def all_reduce_bucket(grads: Sequence[jax.Array], axes: AxisNames) -> list[jax.Array]:
    """Plain data-parallel gradient reduction of a bucket: sum over devices, full shapes.

    Collectives over `axes`: forward 1 all-reduce of the flat bucket
    `[sum_p n_p]` (no padding). Backward: none.
    """
    flat = jnp.concatenate([jnp.ravel(g) for g in grads])  # flat: [sum_p n_p]
    flat = all_reduce(flat, axes)
    out, start = [], 0
    for g in grads:
        out.append(jnp.reshape(flat[start : start + g.size], g.shape))
        start += g.size
    return out


def all_gather_bucket(
    shards: Sequence[jax.Array], shapes: Sequence[tuple[int, ...]], axes: AxisNames
) -> list[jax.Array]:
    """Rebuild full parameters from every device's updated shards.

    Math: device i holds `shard_i(p)` for every p of the bucket; the result is
    every p in its full shape, the same on all devices.

    Shardings (N = size of `axes`):
      shards:  one `[S_p]` per parameter, varying over `axes`
      returns: full shapes, invariant over `axes`

    Collectives over `axes`: forward 1 all-gather of the `[1, S_b]` row into
    `[N, S_b]` (every parameter byte once, plus padding). Backward: 1 reduce-scatter.

    16-bit (and 8-bit) floats travel as unsigned ints of the same width
    (`bitcast_convert_type`, bit-identical): XLA:CPU widens a bf16 all-gather
    to f32, which would double the bytes. Such a bucket is not differentiable.
    """
    n = axis_size(axes)
    row = jnp.concatenate(list(shards))[None]  # row: [1, S_b]
    bucket = gather_bits(row, axes, axis=0)  # bucket: [N, S_b]
    return unpack_bucket(bucket, shapes, n)


def _varying_groups(leaves: Sequence[jax.Array], axes: AxisNames | None):
    """Group leaves by the mesh axes they vary over (those of `axes`, if given)."""
    groups: dict[tuple[str, ...], list[jax.Array]] = {}
    keep = None if axes is None else set(_as_tuple(axes))
    for x in leaves:
        vary = varying_axes(x)  # empty outside shard_map
        key = tuple(sorted(a for a in vary if keep is None or a in keep))
        groups.setdefault(key, []).append(x)
    return groups


def _sum_squares(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x)))


def sharded_tree_norm(tree, ord=None, squared: bool = False, axes: AxisNames | None = None):
    """The norm of a pytree whose leaves may be shards, as if computed on the full arrays.

    Math (ord 2): `sqrt(sum_p ||p||^2)` where a leaf that varies over mesh axes
    A is a shard of a larger array, so its sum of squares is summed over A;
    a leaf invariant over an axis is a replica there and is counted once.
    Leaves are grouped by their varying axes and each group is reduced with
    one all-reduce (ord 1 likewise with sums of |x|; ord inf with a max).

    Outside `shard_map` (no manual axes) this is the plain norm.

    Shardings: leaves of any vma type; returns a scalar invariant over the
    axes it reduced over.

    Collectives: forward 1 all-reduce of one scalar per group of leaves with
    the same varying axes (usually 1). Backward (ord 1, 2): none extra; the
    all-reduce's transpose is the identity on the invariant cotangent.

    Args:
      tree: a pytree of arrays (shards inside shard_map, or full arrays).
      ord: None or 2 (Euclidean), 1, or 'inf' / jnp.inf, as `optax.tree.norm`.
      squared: return the squared norm (ord 2 only, as optax).
      axes: limit the reduction to these mesh axes (default: every axis a
        leaf varies over).
    """
    leaves = [x for x in jax.tree.leaves(tree) if x is not None]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    groups = _varying_groups(leaves, axes)
    if ord in (None, 2, "fro"):
        parts = [all_reduce(sum(_sum_squares(x) for x in xs), ax) for ax, xs in groups.items()]
        sq = sum(parts)
        return sq if squared else jnp.sqrt(sq)
    if squared:
        raise ValueError(f"sharded_tree_norm(ord={ord!r}, squared=True): squared needs ord 2.")
    if ord == 1:
        parts = [all_reduce(sum(jnp.sum(jnp.abs(x)) for x in xs), ax) for ax, xs in groups.items()]
        return sum(parts)
    if ord in ("inf", jnp.inf, math.inf):
        parts = []
        for ax, xs in groups.items():
            local = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in xs]))
            parts.append(all_reduce_max(lax.stop_gradient(local), ax))
        return jnp.max(jnp.stack(parts))
    raise ValueError(
        f"sharded_tree_norm(ord={ord!r}): expected None, 1, 2 or 'inf' (as optax.tree.norm)."
    )
