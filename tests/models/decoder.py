"""A Llama/Gemma-style decoder: RoPE, grouped-query causal attention, RMSNorm,
gated MLP, embedding scaled by sqrt(D) and a head tied to it (`embedder.attend`).

Two projection styles:

- ``projections="einsum"`` (Gemma): `nnx.Einsum` kernels with head axes,
  ``'BTD,DNH->BTNH'`` for q, one ``'BSD,CDKH->CBSKH'`` kernel for k and v,
  ``'BTD,GDF->GBTF'`` for gate and up.
- ``projections="linear"`` (Llama): `nnx.Linear` on flattened heads, with the
  k/v and the gate/up projections fused into one Linear each and split by
  `jnp.split` (what a `parallelize` rewrite must see through).

The MLP activation is GELU (Gemma) for einsum and SiLU (Llama) for linear
unless `activation=` says otherwise. Tokens of length 8 over a vocabulary of
32; the loss is next-token cross-entropy over every position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tests.models._common import cross_entropy

VOCAB, SEQ = 32, 8


def rope(x: jax.Array, max_wavelength: float = 10_000.0) -> jax.Array:
    """Rotary position embedding of x: f32[B, T, heads, H] at positions 0..T-1."""
    t, h = x.shape[1], x.shape[-1]
    half = h // 2
    inv_freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    sin = jnp.sin(angle)[None, :, None, :].astype(x.dtype)
    cos = jnp.cos(angle)[None, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def gqa(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention: q f32[B,T,N,H], k/v f32[B,T,K,H] -> f32[B,T,N,H]."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) * (h**-0.5)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


class EinsumAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs):
        self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (dim, num_heads, head_dim), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BSD,CDKH->CBSKH", (2, dim, num_kv_heads, head_dim), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (num_heads, head_dim, dim), rngs=rngs)

    def __call__(self, x):
        q = rope(self.q_einsum(x))
        k, v = self.kv_einsum(x)
        return self.attn_vec_einsum(gqa(q, rope(k), v))


class LinearAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nnx.Linear(dim, num_heads * head_dim, use_bias=False, rngs=rngs)
        self.kv_proj = nnx.Linear(dim, 2 * num_kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(num_heads * head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k, v = jnp.split(self.kv_proj(x), 2, axis=-1)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        out = gqa(rope(q), rope(k), v)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class EinsumMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, activation=nnx.gelu, *, rngs):
        self.activation = activation
        self.gating_einsum = nnx.Einsum("BTD,GDF->GBTF", (2, dim, hidden), rngs=rngs)
        self.linear = nnx.Einsum("BTF,FD->BTD", (hidden, dim), rngs=rngs)

    def __call__(self, x):
        gate, up = self.gating_einsum(x)
        return self.linear(self.activation(gate) * up)


class LinearMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, activation=nnx.silu, *, rngs):
        self.activation = activation
        self.gate_up_proj = nnx.Linear(dim, 2 * hidden, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.activation(gate) * up)


class Block(nnx.Module):
    def __init__(
        self, dim, num_heads, num_kv_heads, head_dim, hidden, projections, activation, *, rngs
    ):
        attention, mlp = {
            "einsum": (EinsumAttention, EinsumMLP),
            "linear": (LinearAttention, LinearMLP),
        }[projections]
        self.pre_attention_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = attention(dim, num_heads, num_kv_heads, head_dim, rngs=rngs)
        self.pre_ffw_norm = nnx.RMSNorm(dim, rngs=rngs)
        mlp_kwargs = {} if activation is None else {"activation": activation}
        self.mlp = mlp(dim, hidden, rngs=rngs, **mlp_kwargs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class Decoder(nnx.Module):
    def __init__(
        self,
        vocab_size: int = VOCAB,
        dim: int = 16,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 4,
        hidden: int = 32,
        num_layers: int = 2,
        projections: str = "einsum",
        activation=None,
        *,
        rngs: nnx.Rngs,
    ):
        if projections not in ("einsum", "linear"):
            raise ValueError(f"Decoder(projections={projections!r}): use 'einsum' or 'linear'.")
        self.dim = dim
        self.embedder = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.layers = nnx.List([
            Block(dim, num_heads, num_kv_heads, head_dim, hidden, projections, activation,
                  rngs=rngs)
            for _ in range(num_layers)
        ])  # fmt: skip
        self.final_norm = nnx.RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):
        # tokens: i32[B, T] -> logits f32[B, T, V]
        x = self.embedder(tokens) * (self.dim**0.5)
        for layer in self.layers:
            x = layer(x)
        return self.embedder.attend(self.final_norm(x))


def make(seed: int = 0, **kwargs) -> Decoder:
    return Decoder(rngs=nnx.Rngs(seed), **kwargs)


def make_linear(seed: int = 0, **kwargs) -> Decoder:
    return Decoder(rngs=nnx.Rngs(seed), projections="linear", **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    tokens = jax.random.randint(key, (batch_size, SEQ + 1), 0, VOCAB, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def loss_fn(model: Decoder, batch) -> jax.Array:
    return cross_entropy(model(batch["inputs"]), batch["targets"])
