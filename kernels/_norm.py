"""RMSNorm on local tokens (the normalised feature dim is never split).

References:
  Zhang and Sennrich, "Root Mean Square Layer Normalization", 2019
  (arXiv:1910.07467).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def rms_norm(
    x: jax.Array, scale: jax.Array | None, *, epsilon: float = 1e-6, dtype: Any = None
) -> jax.Array:
    """`x / sqrt(mean(x^2, -1) + eps) * scale`, computed as `nnx.RMSNorm` computes it.

    Statistics in at least float32; the result in `dtype` (default: promoted
    from x and scale). Shardings: x [..., D] with D unsplit, any split of the
    leading dims (batch, or sequence under sequence parallelism); scale [D]
    replicated. No collectives forward; backward, the scale's gradient is
    summed over every axis the tokens are split over (by the caller's
    varying cast).
    """
    wide = jnp.dtype(dtype or x.dtype) == jnp.float64
    stat_dtype = jnp.float64 if wide else jnp.float32
    xs = x.astype(stat_dtype)
    var = jnp.mean(lax.square(xs), axis=-1, keepdims=True)  # var: f32[..., 1]
    mul = lax.rsqrt(var + jnp.asarray(epsilon, stat_dtype))
    out_dtype = dtype or x.dtype
    if scale is not None:
        mul = mul * scale.astype(stat_dtype).reshape((1,) * (x.ndim - 1) + (-1,))
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
