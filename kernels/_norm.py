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
    stat_dtype = jnp.promote_types(dtype or jnp.result_type(x), jnp.float32)
    var = jnp.mean(lax.square(x.astype(stat_dtype)), axis=-1, keepdims=True)  # var: [..., 1]
    mul = lax.rsqrt(var + epsilon)
    args = [x]
    if scale is not None:
        mul = mul * scale.reshape((1,) * (x.ndim - 1) + (-1,))
        args.append(scale)
    y = x * mul.astype(jnp.promote_types(x.dtype, mul.dtype))
    out_dtype = dtype or jnp.result_type(*args)
    return y.astype(out_dtype)
