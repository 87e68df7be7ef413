"""A sequence classifier written with flax's recurrent layers and JAX control flow.

An `nnx.RNN(nnx.LSTMCell)` over the sequence (its carry starts at zeros), a
`nnx.GRUCell` refined a few times with `jax.lax.fori_loop` from a learned
initial state, a `jax.lax.cond` whose one branch is a constant, and a
`jax.lax.scan` over decoding steps with no inputs: the control flow people
write on one device, which inside a per-device step sees constant carries
meet the batch shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IN, HIDDEN, OUT, T = 4, 8, 3, 5


class SeqClassifier(nnx.Module):
    def __init__(self, din: int = IN, hidden: int = HIDDEN, dout: int = OUT, refine: int = 2,
                 *, rngs: nnx.Rngs):  # fmt: skip
        self.rnn = nnx.RNN(nnx.LSTMCell(din, hidden, rngs=rngs))
        self.gru = nnx.GRUCell(hidden, hidden, rngs=rngs)
        self.h0 = nnx.Param(0.1 * jax.random.normal(rngs.params(), (hidden,)))
        self.gate = nnx.Param(0.1 * jax.random.normal(rngs.params(), (hidden,)))
        self.head = nnx.Linear(hidden, dout, rngs=rngs)
        self.refine = refine

    def __call__(self, x):  # x [B, T, din]
        last = self.rnn(x)[:, -1]  # [B, hidden]
        h = jnp.broadcast_to(self.h0[...], last.shape)

        def refine(i, h):
            h, _ = self.gru(h, last)
            return h

        h = jax.lax.fori_loop(0, self.refine, refine, h)
        # a gate that is the constant 1 while its parameter is all zero (both branches are
        # traced: the constant one is invariant per device, the other varies)
        gate = jax.lax.cond(
            jnp.all(self.gate[...] == 0.0),
            lambda: jnp.ones(h.shape[-1]),
            lambda: jax.nn.sigmoid(self.gate[...]),
        )

        def decode(c, _):  # a fixed number of steps, no inputs
            n, h = c
            return (n + 1, jnp.tanh(h + last)), None

        (_, h), _ = jax.lax.scan(decode, (0, h * gate[None, :]), length=2)
        return self.head(h)


def make(seed: int = 0, **kwargs) -> SeqClassifier:
    return SeqClassifier(rngs=nnx.Rngs(seed), **kwargs)


def make_batch(key: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (batch_size, T, IN)),
        "y": jax.random.randint(ky, (batch_size,), 0, OUT),
    }


def loss_fn(model: SeqClassifier, batch) -> jax.Array:
    logits = model(batch["x"])
    labels = jax.nn.one_hot(batch["y"], logits.shape[-1])
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))
