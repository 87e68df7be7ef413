"""A ViT-like encoder: patch embedding (a strided Conv), a CLS token, learned
positions, pre-LayerNorm blocks of `nnx.MultiHeadAttention` and a GELU MLP, a
classification head on the CLS token.

8x8x3 images in 4x4 patches: 4 patches + CLS = 5 tokens of width 8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tests.models._common import cross_entropy

SIZE, CHANNELS_IN, PATCH, CLASSES = 8, 3, 4, 5


class EncoderBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class ViT(nnx.Module):
    def __init__(
        self,
        dim: int = 8,
        num_heads: int = 2,
        mlp_dim: int = 16,
        depth: int = 2,
        num_classes: int = CLASSES,
        *,
        rngs: nnx.Rngs,
    ):
        tokens = (SIZE // PATCH) ** 2 + 1
        self.patch_embed = nnx.Conv(
            CHANNELS_IN, dim, kernel_size=(PATCH, PATCH), strides=PATCH, padding="VALID",
            rngs=rngs,
        )  # fmt: skip
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim)) * 0.02)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, tokens, dim)) * 0.02)
        self.blocks = nnx.List(
            [EncoderBlock(dim, num_heads, mlp_dim, rngs=rngs) for _ in range(depth)]
        )
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x):
        # x: f32[B, 8, 8, 3] -> patches f32[B, 4, dim]
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = jnp.broadcast_to(self.cls[...], (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)[:, 0])


def make(seed: int = 0, **kwargs) -> ViT:
    return ViT(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "image": jax.random.normal(kx, (batch_size, SIZE, SIZE, CHANNELS_IN)),
        "label": jax.random.randint(ky, (batch_size,), 0, CLASSES, jnp.int32),
    }


def loss_fn(model: ViT, batch) -> jax.Array:
    return cross_entropy(model(batch["image"]), batch["label"])
