"""RMSNorm on local tokens (the normalised feature dim is never split).

References:
  Zhang and Sennrich, "Root Mean Square Layer Normalization", 2019
  (arXiv:1910.07467).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def canonical_axes(ndim: int, axes: int | Sequence[int]) -> tuple[int, ...]:
    """`axes` as sorted, deduplicated, non-negative dims of a rank-`ndim` array (as flax)."""
    if isinstance(axes, int):
        axes = (axes,)
    return tuple(sorted({a + ndim if a < 0 else a for a in axes}))


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None,
    *,
    epsilon: float = 1e-6,
    dtype: Any = None,
    reduction_axes: int | Sequence[int] = -1,
    feature_axes: int | Sequence[int] = -1,
    mask: jax.Array | None = None,
) -> jax.Array:
    """`x / sqrt(mean(x^2, reduction_axes) + eps) * scale`, computed as `nnx.RMSNorm` computes it.

    Statistics in at least float32; the result in `dtype` (default: promoted
    from x and scale). `mask` (bool, broadcastable to x): only its True
    entries enter the mean, as `nnx.RMSNorm(...)(x, mask=mask)`; `scale`
    (`[prod of x.shape[feature_axes]]`) is laid along `feature_axes`.
    Shardings: the reduction and feature dims unsplit, any split of the
    others (batch, or sequence under sequence parallelism); scale
    replicated; mask laid out as x. No collectives forward; backward, the
    scale's gradient is summed over every axis the tokens are split over
    (by the caller's varying cast).
    """
    wide = jnp.dtype(dtype or x.dtype) == jnp.float64
    stat_dtype = jnp.float64 if wide else jnp.float32
    red = canonical_axes(x.ndim, reduction_axes)
    feat = canonical_axes(x.ndim, feature_axes)
    xs = x.astype(stat_dtype)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    # var: f32[..., 1] (1 on every reduced dim)
    var = jnp.mean(lax.square(xs), axis=red, keepdims=True, where=mask)
    mul = lax.rsqrt(var + jnp.asarray(epsilon, stat_dtype))
    out_dtype = dtype or x.dtype
    if scale is not None:
        shape = [x.shape[a] if a in feat else 1 for a in range(x.ndim)]
        mul = mul * scale.astype(stat_dtype).reshape(shape)
        out_dtype = dtype or _promote(x.dtype, scale.dtype)
    return (xs * mul).astype(out_dtype)


def _promote(a: Any, b: Any) -> Any:
    """Float promotion as numpy's standard lattice, spelled out (works under strict promotion)."""
    a, b = jnp.dtype(a), jnp.dtype(b)
    if a == b:
        return a
    if a.itemsize != b.itemsize:
        return a if a.itemsize > b.itemsize else b
    return jnp.dtype(jnp.float32)  # bfloat16 with float16
