"""Dropout whose mask does not depend on how the array is sharded.

The usual sharded dropout folds the device index into the key, so the mask,
and with it the training run, changes with the mesh. Here the keep/drop bit of
every element is a counter-based hash of (key, the element's *global* flat
index): `threefry2x32(key, (hi, lo) of the index)`, the same bits
`jax.random.bits` draws for the whole array when `jax_threefry_partitionable`
is on (the default). Each device computes the global indices of its own
shard from `axis_index` offsets, so the mask is bit-identical on every mesh
shape, to the unsharded layer, and to `nnx.Dropout` with the same key.

References:
  Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011
  (counter-based generators, Threefry).
  Srivastava et al., "Dropout", JMLR 2014.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

from ._collectives import axis_index

SpecEntry = str | tuple[str, ...] | None


def shard_offsets(local_shape: Sequence[int], spec: Sequence[SpecEntry]) -> list[jax.Array | int]:
    """Global index of this device's first element along each dim (0 where unsplit).

    `spec` is the PartitionSpec of the global array, one entry per dim
    (missing entries count as None). No collectives: `axis_index` only.
    """
    spec = list(spec) + [None] * (len(local_shape) - len(spec))
    out: list[jax.Array | int] = []
    for size, entry in zip(local_shape, spec, strict=True):
        if entry is None or entry == ():
            out.append(0)
        else:
            out.append(axis_index(entry).astype(jnp.uint32) * np.uint32(size))
    return out


def global_uniform_bits(
    key_data: jax.Array,
    local_shape: Sequence[int],
    global_shape: Sequence[int],
    offsets: Sequence[jax.Array | int],
) -> jax.Array:
    """32 random bits per element of a shard, a function of (key, global index) only.

    Equal to `jax.random.bits(key, global_shape)[shard]` under
    `jax_threefry_partitionable=True`. Needs fewer than 2**32 elements in
    `global_shape` (the high counter word is then 0).

    key_data: uint32[2] (`jax.random.key_data` of a threefry key), replicated.
    """
    if math_prod(global_shape) >= 2**32:
        raise ValueError(
            f"global_uniform_bits(global_shape={tuple(global_shape)}): at most 2**32 - 1 "
            f"elements are supported. Apply dropout to smaller arrays (e.g. per layer)."
        )
    strides = [
        int(np.prod(global_shape[d + 1 :], dtype=np.int64)) for d in range(len(global_shape))
    ]
    lo = jnp.zeros(tuple(local_shape), jnp.uint32)
    for d, (stride, off) in enumerate(zip(strides, offsets, strict=True)):
        coord = lax.broadcasted_iota(jnp.uint32, tuple(local_shape), d) + jnp.asarray(
            off, jnp.uint32
        )
        lo = lo + coord * np.uint32(stride)
    hi = jnp.zeros_like(lo)
    key_data = key_data.astype(jnp.uint32)
    bits1, bits2 = threefry2x32_p.bind(key_data[0], key_data[1], hi, lo)
    return bits1 ^ bits2


def math_prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """f32 in [0, 1) from uint32 bits, exactly as `jax.random.uniform` does it."""
    mantissa = lax.shift_right_logical(bits, jnp.uint32(32 - 23))
    one = jnp.asarray(np.array(1.0, np.float32).view(np.uint32), jnp.uint32)
    floats = lax.bitcast_convert_type(lax.bitwise_or(mantissa, one), jnp.float32)
    return lax.max(jnp.float32(0.0), floats - jnp.float32(1.0))


def global_bernoulli(
    key_data: jax.Array,
    p: float,
    local_shape: Sequence[int],
    global_shape: Sequence[int],
    spec: Sequence[SpecEntry],
    *,
    broadcast_dims: Sequence[int] = (),
) -> jax.Array:
    """This shard of `jax.random.bernoulli(key, p, global_shape)`, bit for bit.

    The shard is the one of a global array of `global_shape` laid out as
    `spec` (offsets from `axis_index`); dims in `broadcast_dims` share one
    value (size 1 in the drawn mask, broadcast back). Returns bool of
    `local_shape`. Collectives: none.
    """
    local_mask_shape = list(local_shape)
    global_mask_shape = list(global_shape)
    offsets = shard_offsets(tuple(local_shape), spec)
    for d in broadcast_dims:
        d = d % len(local_shape)
        local_mask_shape[d] = 1
        global_mask_shape[d] = 1
        offsets[d] = 0
    bits = global_uniform_bits(key_data, local_mask_shape, global_mask_shape, offsets)
    keep = uniform_from_bits(bits) < jnp.float32(p)
    return jnp.broadcast_to(keep, tuple(local_shape))


def sharding_invariant_dropout(
    x_shard: jax.Array,
    key_data: jax.Array,
    *,
    rate: float,
    global_shape: Sequence[int],
    spec: Sequence[SpecEntry],
    broadcast_dims: Sequence[int] = (),
) -> jax.Array:
    """`where(keep, x / (1 - rate), 0)` with `keep = uniform(key, global index) < 1 - rate`.

    Shardings: x_shard is the shard of a global array of `global_shape` laid
    out as `spec`; key_data uint32[2] replicated; returns like x_shard. Dims in
    `broadcast_dims` share one mask value (as `nnx.Dropout`). Collectives:
    none, forward or backward.
    """
    keep_prob = 1.0 - rate
    keep = global_bernoulli(
        key_data, keep_prob, x_shard.shape, global_shape, spec, broadcast_dims=broadcast_dims
    )
    return lax.select(
        keep, x_shard / jnp.asarray(keep_prob, x_shard.dtype), jnp.zeros_like(x_shard)
    )
