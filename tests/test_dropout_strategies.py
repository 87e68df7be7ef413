"""shardlax.nn.Dropout and nnx.Dropout under dp / zero1 / zero2: the one-device masks.

A model whose dropout is `shardlax.nn.Dropout(mesh=mesh)` (or plain
`nnx.Dropout`) trains through `shardlax.Trainer` exactly as the same model
with `nnx.Dropout` on one device with plain nnx + optax: the masks are
bit-identical (the losses agree to f32 rounding and the RNG counts advance as
on one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from tests import utils
from tests.models import batches, host, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion


class DropMLP(nnx.Module):
    def __init__(self, dropout, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(6, 32, rngs=rngs)
        self.drop = dropout
        self.l2 = nnx.Linear(32, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.l1(x))))


def make_batch(key, size):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (size, 6)), "y": jax.random.normal(ky, (size, 3))}


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def tx():
    return utils.adamw_clipped(1e-3, weight_decay=1e-4)  # optax.adamw's default decay


def plain():
    return DropMLP(nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7)), nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["shardlax", "nnx"])
@pytest.mark.parametrize(("strategy", "n"), [("dp", 4), ("zero1", 2), ("zero2", 8)])
def test_dropout_masks_are_the_one_device_masks(kind, strategy, n):
    mesh = utils.mesh(data=n)
    data = batches(make_batch, 16, 3)
    ref = one_device_reference(plain, loss_fn, tx(), data)
    if kind == "shardlax":
        drop = shardlax.nn.Dropout(0.5, rngs=nnx.Rngs(dropout=7), mesh=mesh)
    else:
        drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    trainer = shardlax.Trainer(DropMLP(drop, nnx.Rngs(0)), tx(), loss_fn, mesh=mesh,
                               strategy=strategy)  # fmt: skip
    state = trainer.init()
    losses = []
    for batch in data:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    utils.assert_close(np.array(losses), np.array(ref.losses))
    got = host(nnx.state(trainer.model(state), nnx.Param))
    for (path, g), (_, w) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree_util.tree_flatten_with_path(ref.params)[0],
                                 strict=True):  # fmt: skip
        utils.assert_close(g, w, err_msg=jax.tree_util.keystr(path))
    # the dropout stream advanced once per step, as on one device
    count = host(nnx.state(trainer.model(state), nnx.RngCount))
    assert [int(c) for c in jax.tree.leaves(count)] == [3]
