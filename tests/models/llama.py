"""A Llama-style decoder written the way tensor-parallel code bases write it.

Like `decoder.make_linear` (fused `[k | v]` and `[gate | up]` `nnx.Linear`
projections, RoPE, grouped-query attention, RMSNorm, SiLU, a head tied to the
embedding), but the attention reads head counts from the arrays
(``reshape(b, t, -1, head_dim)``, as torchtitan's Llama does), and a fused
output is split by `parts`, which also accepts the already-split parts a
`shardlax.Colwise(parts=2)` twin returns. So the same code runs on one device,
under `shardlax.parallelize` at top level, and inside `shardlax.Trainer`, where
the twins return per-device arrays (their heads only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tests.models import decoder
from tests.models._common import cross_entropy

VOCAB, SEQ = decoder.VOCAB, decoder.SEQ


def parts(y, k: int):
    """The `k` parts of a fused projection's output: a twin's tuple, or `jnp.split` of one array."""
    return tuple(y) if isinstance(y, tuple) else tuple(jnp.split(y, k, axis=-1))


class Attention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs):
        self.head_dim = head_dim
        self.q_proj = nnx.Linear(dim, num_heads * head_dim, use_bias=False, rngs=rngs)
        self.kv_proj = nnx.Linear(dim, 2 * num_kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(num_heads * head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        h = self.head_dim
        q = self.q_proj(x).reshape(b, t, -1, h)
        k, v = (p.reshape(b, t, -1, h) for p in parts(self.kv_proj(x), 2))
        out = decoder.gqa(decoder.rope(q), decoder.rope(k), v)
        return self.o_proj(out.reshape(b, t, -1))


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs):
        self.gate_up_proj = nnx.Linear(dim, 2 * hidden, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        gate, up = parts(self.gate_up_proj(x), 2)
        return self.down_proj(nnx.silu(gate) * up)


class Block(nnx.Module):
    def __init__(self, dim, num_heads, num_kv_heads, head_dim, hidden, *, rngs):
        self.pre_attention_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, num_kv_heads, head_dim, rngs=rngs)
        self.pre_ffw_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class Llama(nnx.Module):
    def __init__(
        self, vocab_size: int = VOCAB, dim: int = 16, num_heads: int = 8, num_kv_heads: int = 4,
        head_dim: int = 2, hidden: int = 32, num_layers: int = 2, *, rngs: nnx.Rngs,
    ):  # fmt: skip
        self.embedder = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.layers = nnx.List([
            Block(dim, num_heads, num_kv_heads, head_dim, hidden, rngs=rngs)
            for _ in range(num_layers)
        ])  # fmt: skip
        self.final_norm = nnx.RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):
        # tokens: i32[B, T] -> logits f32[B, T, V]
        x = self.embedder(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.embedder.attend(self.final_norm(x))


def make(seed: int = 0, **kwargs) -> Llama:
    return Llama(rngs=nnx.Rngs(seed), **kwargs)


make_batch = decoder.make_batch


def loss_fn(model: Llama, batch) -> jax.Array:
    return cross_entropy(model(batch["inputs"]), batch["targets"])
