"""A plain MLP: 6 -> 10 -> 3, tanh, mean squared error.

No size is divisible by 4 or 8, so ZeRO / FSDP pad every parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IN, HIDDEN, OUT = 6, 10, 3


class MLP(nnx.Module):
    def __init__(self, din: int = IN, dhidden: int = HIDDEN, dout: int = OUT, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.l2 = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def make(seed: int = 0, **kwargs) -> MLP:
    return MLP(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (batch_size, IN)),
        "y": jax.random.normal(ky, (batch_size, OUT)),
    }


def loss_fn(model: MLP, batch) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
