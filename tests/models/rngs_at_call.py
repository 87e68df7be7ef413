"""A model that takes its rngs at call time: `model(x, rngs=rngs)`, with an
`nnx.Dropout` built without rngs (the key comes with every call).

Two ways a user hands it the rngs under the `loss_fn(model, batch)` contract:

- `loss_fn`: the model owns an `nnx.Rngs` (`model.rngs`) and the loss passes
  it at call; the stream is model state and advances per step.
- `make_closure_loss_fn(rngs)`: the loss closes over an `nnx.Rngs` created
  outside (a Python side effect under `jit`: a trainer must either carry it or
  refuse it with a clear error, never silently reuse one key).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

IN, HIDDEN, OUT = 6, 16, 3


class DropoutMLP(nnx.Module):
    def __init__(
        self,
        din: int = IN,
        dhidden: int = HIDDEN,
        dout: int = OUT,
        dropout_rate: float = 0.5,
        dropout_seed: int = 1,
        *,
        rngs: nnx.Rngs,
    ):
        self.l1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)
        self.l2 = nnx.Linear(dhidden, dout, rngs=rngs)
        self.rngs = nnx.Rngs(dropout=dropout_seed)

    def __call__(self, x, *, rngs: nnx.Rngs | None = None):
        h = self.dropout(jnp.tanh(self.l1(x)), rngs=rngs)
        return self.l2(h)


def make(seed: int = 0, **kwargs) -> DropoutMLP:
    return DropoutMLP(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (batch_size, IN)),
        "y": jax.random.normal(ky, (batch_size, OUT)),
    }


def loss_fn(model: DropoutMLP, batch) -> jax.Array:
    return jnp.mean((model(batch["x"], rngs=model.rngs) - batch["y"]) ** 2)


def make_closure_loss_fn(rngs: nnx.Rngs) -> Callable[[DropoutMLP, dict], jax.Array]:
    def closure_loss_fn(model: DropoutMLP, batch) -> jax.Array:
        return jnp.mean((model(batch["x"], rngs=rngs) - batch["y"]) ** 2)

    return closure_loss_fn
