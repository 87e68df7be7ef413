"""A model whose forward updates non-parameter state: a call counter and a
running mean of its hidden activations (two custom `nnx.Variable` types)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IN, HIDDEN, OUT = 6, 8, 3


class Count(nnx.Variable):
    """How many times the forward ran."""


class RunningMean(nnx.Variable):
    """An exponential moving average of the batch mean of the hidden layer."""


class CounterMLP(nnx.Module):
    def __init__(
        self,
        din: int = IN,
        dhidden: int = HIDDEN,
        dout: int = OUT,
        momentum: float = 0.9,
        *,
        rngs: nnx.Rngs,
    ):
        self.momentum = momentum
        self.l1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.l2 = nnx.Linear(dhidden, dout, rngs=rngs)
        self.calls = Count(jnp.zeros((), jnp.int32))
        self.hidden_mean = RunningMean(jnp.zeros((dhidden,), jnp.float32))

    def __call__(self, x):
        h = jnp.tanh(self.l1(x))
        self.calls[...] += 1
        batch_mean = jax.lax.stop_gradient(jnp.mean(h, axis=0))
        m = self.momentum
        self.hidden_mean[...] = m * self.hidden_mean[...] + (1.0 - m) * batch_mean
        return self.l2(h)


def make(seed: int = 0, **kwargs) -> CounterMLP:
    return CounterMLP(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (batch_size, IN)),
        "y": jax.random.normal(ky, (batch_size, OUT)),
    }


def loss_fn(model: CounterMLP, batch) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
