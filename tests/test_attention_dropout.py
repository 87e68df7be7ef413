"""nnx.MultiHeadAttention with per-example attention dropout trains as on one device.

With `broadcast_dropout=False` flax draws one mask over the whole attention
weights `[batch, heads, q, k]`; drawn on a batch shard, every device would
repeat the first examples' mask (measured before the fix: loss 0.829 on 2
devices for 1.101 on one). The Trainer step and `fully_shard` units draw this
device's slice of the one-device mask instead (`kernels.global_bernoulli`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import kernels
from tests import utils
from tests.models import batches, host, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion

D, HEADS, L, OUT = 8, 2, 4, 3


class Attend(nnx.Module):
    def __init__(self, rngs, broadcast=False, attention_fn=None):
        kw = {} if attention_fn is None else {"attention_fn": attention_fn}
        self.attn = nnx.MultiHeadAttention(
            HEADS, D, decode=False, dropout_rate=0.5, broadcast_dropout=broadcast,
            deterministic=False, rngs=rngs, **kw,
        )  # fmt: skip
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        return self.head(self.attn(x)).mean(1)


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def make_batch(key, n):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, L, D)), "y": jax.random.normal(ky, (n, OUT))}


@pytest.mark.parametrize(
    ("strategy", "shape", "unit"),
    [("dp", (2, 1, 1), False), ("zero2", (4, 1, 1), False), ("fsdp", (2, 4, 1), True)],
    ids=str,
)
@pytest.mark.parametrize("broadcast", [False, True], ids=["per_example", "broadcast"])
def test_attention_dropout_trains_like_one_device(strategy, shape, unit, broadcast):
    data = batches(make_batch, 8, 3)
    tx = utils.adamw_clipped(1e-3)
    ref = one_device_reference(lambda: Attend(nnx.Rngs(0), broadcast), loss_fn, tx, data)
    mesh = utils.mesh(*shape)
    model = Attend(nnx.Rngs(0), broadcast)
    if unit:
        model = shardlax.fully_shard(model, mesh=mesh)
    trainer = shardlax.Trainer(model, tx, loss_fn, mesh=mesh, strategy=strategy)
    state, losses = trainer.init(), []
    for batch in data:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    utils.assert_close(np.array(losses), np.array(ref.losses))
    got = trainer.model(state)
    want = ref.params["attn"]
    for name in ("query", "key", "value", "out"):
        utils.assert_close(
            host(getattr(got.attn, name).kernel[...]), want[name]["kernel"][...], err_msg=name
        )


def test_custom_attention_fn_with_per_example_dropout_is_refused():
    mesh = utils.mesh(2, 1, 1)

    def my_attention(q, k, v, **kw):
        return nnx.dot_product_attention(q, k, v, **kw)

    model = Attend(nnx.Rngs(0), attention_fn=my_attention)
    trainer = shardlax.Trainer(model, optax.sgd(1e-2), loss_fn, mesh=mesh, strategy="dp")
    with pytest.raises(ValueError, match=r"broadcast_dropout=False\) with a custom attention_fn"):
        trainer.step(trainer.init(), make_batch(jax.random.key(0), 8))


def test_global_bernoulli_is_the_slice_of_the_one_device_draw():
    mesh = utils.mesh(2, 2, 1, axis_types="auto")
    key = jax.random.key(7)
    shape = (8, 2, 4, 4)
    want = jax.random.bernoulli(key, 0.7, shape)

    def body(k):
        return kernels.global_bernoulli(k, 0.7, (2, 2, 4, 4), shape, (("data", "fsdp"),))

    got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(("data", "fsdp"))))(
        jax.random.key_data(key)
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_key_that_is_not_threefry_is_refused():
    """The global masks are threefry's bits of the global index: another PRNG is an error."""
    mesh = utils.mesh(2, 1, 1)
    batch = make_batch(jax.random.key(0), 8)

    class Drop(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(D, OUT, rngs=nnx.Rngs(0))
            self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=jax.random.key(0, impl="rbg")))

        def __call__(self, x):
            return self.drop(self.lin(x)).mean(1)

    rbg = nnx.Rngs(0, dropout=jax.random.key(0, impl="rbg"))
    for model, who in ((Drop(), r"nnx\.Dropout\(rate=0\.5\)"),
                       (Attend(rbg), r"nnx\.MultiHeadAttention\(dropout_rate=0\.5\)")):  # fmt: skip
        trainer = shardlax.Trainer(model, optax.sgd(1e-2), loss_fn, mesh=mesh, strategy="dp")
        with pytest.raises(
            ValueError, match=who + r".*key has data shape \(4,\), not the threefry"
        ):
            trainer.step(trainer.init(), batch)
