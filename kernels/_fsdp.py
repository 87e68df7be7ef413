"""FSDP (ZeRO-3) per device: gather a parameter on use, reduce-scatter its gradient.

A parameter `W` of global shape `[..., K, ...]` is stored split on one dim
`k` over the fsdp axis (N devices): device i holds `W_i`, a `K/N` slice.
Inside the layer's `shard_map`, `fsdp_gather` rebuilds the whole `W` on
every device just before use (one tiled all-gather), and autodiff (or the
hand-written backward of the mixed-precision path) turns the gradient of the
gathered `W` into this device's slice of the summed gradient (one tiled
reduce-scatter): `dW_i = sum over devices d of (dW computed on d's batch)_i`.
The batch is split over the fsdp axis too, so each device's gradient of the
gathered `W` is a partial sum that the reduce-scatter completes.

Parameters replicated over a pure data axis (`replicated_axes`, usually
`'data'`) are cast to varying over it *before* the gather, so that their
gradients are all-reduced over it as 1/N-sized shards, after the
reduce-scatter, instead of as whole parameters.

Collectives per gathered parameter, per call:
  forward:  1 all-gather over the fsdp axis of `|W|` bytes (gathered size, in
            the gather dtype).
  backward: 1 reduce-scatter over the fsdp axis of `|W|` bytes (in the reduce
            dtype) + 1 all-reduce over `replicated_axes` of `|W|/N` bytes;
            with `reshard_after_forward` (`reshard_policy` under
            `jax.checkpoint`), 1 more all-gather when the backward needs `W`.

References:
  Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", 2020 (arXiv:1910.02054), stage 3.
  Zhao et al., "PyTorch FSDP", 2023 (arXiv:2304.11277).
  JAX shard_map notebook, `predict_fsdp` (docs/notebooks/shard_map.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._collectives import (
    _as_tuple,
    all_gather,
    all_reduce,
    ensure_varying,
    reduce_scatter,
    varying_axes,
)

#: Primitives whose outputs `reshard_policy` never saves for the backward:
#: they only move, cast or relabel data (a gathered parameter and its casts,
#: reshapes and transposes are all of this kind), so recomputing them from
#: their inputs costs no FLOPs, only the re-gather.
MOVEMENT_PRIMITIVES = frozenset(
    {
        "all_gather",
        "all_gather_invariant",
        "bitcast_convert_type",
        "broadcast_in_dim",
        "convert_element_type",
        "copy",
        "copy_p",
        "expand_dims",
        "name",
        "pcast",
        "pvary",
        "reduce_precision",
        "reshape",
        "squeeze",
        "transpose",
    }
)


def reshard_policy(prim: Any, *_: Any, **__: Any) -> bool:
    """`jax.checkpoint` policy of `reshard_after_forward=True`.

    Saves every intermediate (activations, matmul outputs) except the outputs
    of data-movement primitives (`MOVEMENT_PRIMITIVES`). A gathered parameter
    is such an output, and so is every cast, reshape or transpose of it, so
    the backward re-gathers it from the 1/N shard instead of keeping it from
    the forward; no matmul is recomputed.
    """
    return prim.name not in MOVEMENT_PRIMITIVES


def _bits_dtype(dtype: Any) -> Any | None:
    """The unsigned int of the same width for a sub-32-bit float, else None."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize >= 4:
        return None
    return {1: jnp.uint8, 2: jnp.uint16}[dtype.itemsize]


def gather_bits(x: jax.Array, axis_name: str, *, axis: int) -> jax.Array:
    """Tiled all-gather of `x` as raw bits when it is a 16/8-bit float.

    XLA:CPU rewrites a bf16 all-gather into an f32 one (twice the bytes);
    gathering the bits as `u16` is bit-identical and no backend widens it.
    Not differentiable: used inside `fsdp_gather`'s hand-written backward.
    """
    bits = _bits_dtype(x.dtype)
    if bits is None:
        return all_gather(x, axis_name, axis=axis, invariant=False)
    raw = lax.bitcast_convert_type(x, bits)
    raw = all_gather(raw, axis_name, axis=axis, invariant=False)
    return lax.bitcast_convert_type(raw, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _gather_cast(
    shard: jax.Array,
    axis_name: str,
    dim: int,
    replicated: tuple[str, ...],
    gather_dtype: Any,
    reduce_dtype: Any,
) -> jax.Array:
    # shard: [..., K/N, ...] stored dtype -> returns [..., K, ...] gather_dtype
    shard = ensure_varying(shard, replicated)
    return gather_bits(shard.astype(gather_dtype), axis_name, axis=dim)


def _gather_cast_fwd(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype):
    out = _gather_cast(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype)
    return out, jnp.zeros((0,), shard.dtype)  # residual: only the stored dtype


def _gather_cast_bwd(axis_name, dim, replicated, gather_dtype, reduce_dtype, res, ct):
    # ct: [..., K, ...] in gather_dtype, a partial sum (this device's batch)
    ct = ct.astype(reduce_dtype)
    ct_shard = reduce_scatter(ct, axis_name, axis=dim)  # ct_shard: [..., K/N, ...]
    ct_shard = all_reduce(ct_shard, replicated)  # summed over the pure data axes
    return (ct_shard.astype(res.dtype),)


_gather_cast.defvjp(_gather_cast_fwd, _gather_cast_bwd)


def fsdp_gather(
    shard: jax.Array,
    axis_name: str,
    *,
    dim: int = 0,
    replicated_axes: Sequence[str] | str = (),
    gather_dtype: Any = None,
    reduce_dtype: Any = None,
) -> jax.Array:
    """All-gather an FSDP-sharded parameter for use; its gradient is reduce-scattered.

    Math: `W = concat_i(W_i)` along `dim` (i over `axis_name`); the gradient
    of `W_i` is `sum_d dW^(d)` restricted to slice i, where `dW^(d)` is the
    gradient device d computes from its batch shard.

    Shardings (N = size of `axis_name`, K = the global size of `dim`):
      shard:   [..., K/N, ...]  this device's slice; varying over `axis_name`
               and invariant over `replicated_axes`.
      returns: [..., K, ...]    the whole parameter (over `axis_name`), typed
               varying over `axis_name` and `replicated_axes` so that the
               batch-dependent gradient flows back unreduced.

    Collectives:
      forward:  1 all-gather over `axis_name` of the gathered bytes, in
                `gather_dtype` (16-bit floats travel as `u16` bits).
      backward: 1 reduce-scatter over `axis_name` of the gathered bytes in
                `reduce_dtype`, then 1 all-reduce over `replicated_axes` of
                the shard (1/N of the bytes).

    Args:
      shard: this device's slice of the parameter, in its stored dtype.
      axis_name: the fsdp mesh axis.
      dim: the dim of the parameter that is split over `axis_name`.
      replicated_axes: batch axes the parameter is replicated over (pure
        data parallelism): its gradient is summed over them too.
      gather_dtype: dtype to cast the shard to *before* the gather (default:
        the stored dtype). The result has this dtype.
      reduce_dtype: dtype the gradient is reduced in (default: the stored
        dtype); the gradient is returned in the stored dtype.

    With both dtypes equal to the stored one (>= 32 bits) the gather is a
    plain tiled all-gather whose transpose autodiff derives (a tiled
    psum_scatter, then the transpose of the cast to varying: a psum over
    `replicated_axes`). Otherwise a `custom_vjp` states the same backward
    with the casts in the right places.
    """
    replicated = tuple(
        a for a in _as_tuple(replicated_axes) if a != axis_name and a not in varying_axes(shard)
    )
    stored = jnp.dtype(shard.dtype)
    gather_dtype = stored if gather_dtype is None else jnp.dtype(gather_dtype)
    reduce_dtype = stored if reduce_dtype is None else jnp.dtype(reduce_dtype)
    if gather_dtype == stored == reduce_dtype and _bits_dtype(stored) is None:
        shard = ensure_varying(shard, replicated)
        return all_gather(shard, axis_name, axis=dim, invariant=False)  # [..., K, ...]
    return _gather_cast(shard, axis_name, dim, replicated, gather_dtype, reduce_dtype)
