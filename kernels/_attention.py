"""Head-parallel causal self-attention (Megatron-LM), per device inside `jax.shard_map`.

Heads are independent, so splitting them over the model axis needs no
communication inside attention: Q, K and V come from column-parallel
projections (each device computes its own heads), attention runs locally,
and the output projection is row-parallel (one all-reduce, or a
reduce-scatter of the sequence under sequence parallelism).

References:
  Shoeybi et al., "Megatron-LM", 2019 (arXiv:1909.08053), section 3, fig. 3b.
  Ainslie et al., "GQA", 2023 (arXiv:2305.13245): grouped-query attention.
  Su et al., "RoFormer", 2021 (arXiv:2104.09864): rotary position embedding.
  Korthikanti et al., 2022 (arXiv:2205.05198): sequence parallelism.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._linear import DotGeneral, _add_bias, matmul_last
from ._sequence import enter_tensor_parallel, exit_tensor_parallel


def rotary_embedding(x: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotate pairs `(x[..., j], x[..., j + d/2])` by `pos * theta^(-2j/d)` (RoPE, half split).

    x: [B, S, H, d] with positions `0..S-1` on axis 1 (the full sequence: under
    sequence parallelism attention runs after the all-gather). Computed in
    float32, returned in x's dtype. No collectives.
    """
    s, d = x.shape[1], x.shape[-1]
    half = d // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)  # freq: f32[d/2]
    angle = jnp.arange(s, dtype=jnp.float32)[:, None] * freq[None, :]  # angle: f32[S, d/2]
    cos = jnp.cos(angle)[None, :, None, :]
    sin = jnp.sin(angle)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + causal mask) v for the heads at hand, grouped-query aware.

    q: [B, S, Hq, d]; k, v: [B, S, Hkv, d] with Hkv dividing Hq: query head h
    reads key/value head `h // (Hq/Hkv)`. Scores and softmax in float32.
    Returns [B, S, Hq, d] in q's dtype. No collectives.
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, s, hkv, g, d)  # qg: [B, S, Hkv, G, d]
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(d))  # scores: f32[B, Hkv, G, S, S]
    if causal:
        allowed = jnp.tril(jnp.ones((s, s), dtype=bool))
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)  # out: [B, S, Hkv, G, d]
    return out.reshape(b, s, hq, d)


def head_parallel_attention(
    x: jax.Array,
    q_kernel: jax.Array,
    k_kernel: jax.Array,
    v_kernel: jax.Array,
    o_kernel: jax.Array,
    q_bias: jax.Array | None = None,
    k_bias: jax.Array | None = None,
    v_bias: jax.Array | None = None,
    o_bias: jax.Array | None = None,
    *,
    head_dim: int,
    axis_name: str = "model",
    sequence_parallel: bool = False,
    causal: bool = True,
    rope_theta: float | None = 10000.0,
    precision: Any = None,
    dot_general: DotGeneral = lax.dot_general,
) -> jax.Array:
    """Causal self-attention with the heads split over `axis_name`.

    Math (per device i, its heads H/N and key/value heads Hkv/N):
      `q_i = x Wq_i, k_i = x Wk_i, v_i = x Wv_i` (+ RoPE on q, k),
      `o_i = attention(q_i, k_i, v_i)`, `y = sum_i o_i Wo_i + bo`.
    Grouped-query heads stay local because both H and Hkv are split in
    contiguous blocks: local query head j reads local kv head `j // (H/Hkv)`.

    Shardings (N = size of `axis_name`, d = head_dim):
      x:        [B, S, D]      replicated over `axis_name` (SP: [B, S/N, D])
      q_kernel: [D, H d/N]     `P(None, axis_name)`; k/v_kernel: [D, Hkv d/N]
      o_kernel: [H d/N, D]     `P(axis_name, None)`; o_bias: [D] replicated
      returns:  like x

    Collectives over `axis_name`:
      forward:  1 all-reduce of y `[B, S, D]` (SP: 1 all-gather of x and
                1 reduce-scatter of y).
      backward: 1 all-reduce of dx, shared by the three projections (SP: 1
                all-gather of dy and 1 reduce-scatter of dx).
    """
    x = enter_tensor_parallel(x, axis_name, sequence_parallel=sequence_parallel)  # [B, S, D]
    b, s = x.shape[0], x.shape[1]

    def project(kernel, bias):
        y = matmul_last(x, kernel, precision=precision, dot_general=dot_general)
        return _add_bias(y, bias).reshape(b, s, -1, head_dim)

    q = project(q_kernel, q_bias)  # q: [B, S, H/N, d]
    k = project(k_kernel, k_bias)  # k: [B, S, Hkv/N, d]
    v = project(v_kernel, v_bias)  # v: [B, S, Hkv/N, d]
    if rope_theta is not None:
        q = rotary_embedding(q, theta=rope_theta)
        k = rotary_embedding(k, theta=rope_theta)
    o = dot_product_attention(q, k, v, causal=causal).reshape(b, s, -1)  # o: [B, S, H d/N]
    partial = matmul_last(o, o_kernel, precision=precision, dot_general=dot_general)
    y = exit_tensor_parallel(partial, axis_name, sequence_parallel=sequence_parallel)
    return _add_bias(y, o_bias)
