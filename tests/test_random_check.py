"""Random numbers drawn by the model's own code: exact where they can be, refused where not.

Inside a `Trainer` step the model runs on each device's batch shard. A draw
whose shape (or count) follows the batch would repeat on every device; the
first step refuses it, naming the shape and the model's line. A draw that
does not follow the batch is the one-device draw, and trains as on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shardlax
from tests import utils
from tests.models import batches, host, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion


class Noisy(nnx.Module):
    """h + noise, the noise drawn as `shape(h)` gives it."""

    def __init__(self, noise_shape, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.noise_shape = noise_shape
        self.rngs = rngs.fork()

    def __call__(self, x):
        h = self.lin(x)
        return h + 0.1 * jax.random.normal(self.rngs.noise(), self.noise_shape(h))


class PerExample(nnx.Module):
    """One small draw per example, in a Python loop over the batch."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.rngs = rngs.fork()

    def __call__(self, x):
        h = self.lin(x)
        noise = jnp.stack([jax.random.normal(self.rngs.noise(), (4,)) for _ in range(h.shape[0])])
        return h + noise


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def make_batch(key, size):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (size, 4)), "y": jax.random.normal(ky, (size, 4))}


def rngs():
    return nnx.Rngs(0, noise=1)


@pytest.mark.parametrize("strategy", ["dp", "zero2", "fsdp"])
def test_a_draw_that_follows_the_batch_is_refused(strategy):
    mesh = utils.mesh(data=2) if strategy != "fsdp" else utils.mesh(data=2, fsdp=2)
    model = Noisy(lambda h: h.shape, rngs())
    if strategy == "fsdp":
        model.lin = shardlax.fully_shard(model.lin, mesh=mesh)
    trainer = shardlax.Trainer(model, optax.adam(1e-2), loss_fn, mesh=mesh, strategy=strategy)
    n = 2 if strategy != "fsdp" else 4
    with pytest.raises(ValueError) as err:
        trainer.step(trainer.init(), make_batch(jax.random.key(0), 8))
    msg = str(err.value)
    assert f"Trainer(strategy={strategy!r})" in msg
    assert f"shape {(8 // n, 4)} on each device" in msg
    assert "test_random_check.py" in msg and "Noisy.__call__" in msg  # the model's line
    assert f"the {n} devices would draw the same" in msg
    assert "Trainer(per_device_random=True)" in msg


def test_a_draw_count_that_follows_the_batch_is_refused():
    mesh = utils.mesh(data=2)
    trainer = shardlax.Trainer(PerExample(rngs()), optax.adam(1e-2), loss_fn, mesh=mesh,
                               strategy="dp")  # fmt: skip
    with pytest.raises(ValueError) as err:
        trainer.step(trainer.init(), make_batch(jax.random.key(0), 8))
    msg = str(err.value)
    assert "4 times for a batch and 8 times for a batch twice as large" in msg
    assert "PerExample.__call__" in msg and "Trainer(per_device_random=True)" in msg


def test_per_device_random_accepts_the_draws():
    mesh = utils.mesh(data=2)
    trainer = shardlax.Trainer(Noisy(lambda h: h.shape, rngs()), optax.adam(1e-2), loss_fn,
                               mesh=mesh, strategy="dp", per_device_random=True)  # fmt: skip
    _, metrics = trainer.step(trainer.init(), make_batch(jax.random.key(0), 8))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2"])
def test_a_draw_shared_by_the_batch_trains_as_on_one_device(strategy):
    """A (1, 4) noise row added to every example: one device draws the same one."""
    mesh = utils.mesh(data=4)
    data = batches(make_batch, 16, 3)

    def model():
        return Noisy(lambda h: (1, *h.shape[1:]), rngs())

    ref = one_device_reference(model, loss_fn, optax.adam(1e-2), data)
    trainer = shardlax.Trainer(model(), optax.adam(1e-2), loss_fn, mesh=mesh, strategy=strategy)
    state, losses = trainer.init(), []
    for batch in data:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    utils.assert_close(np.array(losses), np.array(ref.losses))
    got = host(nnx.state(trainer.model(state), nnx.Param))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(ref.params), strict=True):
        utils.assert_close(g, w)


def test_one_batch_shard_is_not_checked():
    """With the batch on one device every draw is the one-device draw."""
    trainer = shardlax.Trainer(Noisy(lambda h: h.shape, rngs()), optax.adam(1e-2), loss_fn,
                               mesh=utils.mesh(model=2), strategy="dp")  # fmt: skip
    _, metrics = trainer.step(trainer.init(), make_batch(jax.random.key(0), 8))
    assert np.isfinite(float(metrics["loss"]))


def test_the_check_does_not_compile_again():
    """The check reads the step's trace (jax.jit caches it) and traces a doubled batch
    abstractly: five steps compile once."""
    trainer = shardlax.Trainer(Noisy(lambda h: (1, *h.shape[1:]), rngs()), optax.adam(1e-2),
                               loss_fn, mesh=utils.mesh(data=2), strategy="zero2")  # fmt: skip
    state, batch = trainer.init(), make_batch(jax.random.key(0), 8)
    with utils.count_compiles("_step") as compiles:
        for _ in range(5):
            state, _ = trainer.step(state, batch)
    assert compiles.count == 1


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x, key):
        h = self.lin(x)
        return h + jax.random.normal(key, h.shape)


def test_a_unit_refuses_a_draw_that_follows_the_batch():
    """A unit called in the user's own jit (no Trainer) checks its own program."""
    mesh = utils.mesh(data=2, fsdp=2)
    unit = shardlax.fully_shard(Block(nnx.Rngs(0)), mesh=mesh)
    x = jnp.ones((8, 4))
    with pytest.raises(ValueError) as err:
        nnx.jit(lambda u, x, k: u(x, k))(unit, x, jax.random.key(1))
    msg = str(err.value)
    assert "fully_shard(Block).__call__" in msg or "FSDPModule(Block)" in msg
    assert "shape (2, 4) on each device" in msg and "Block.__call__" in msg
    assert "fully_shard(..., per_device_random=True)" in msg
    free = shardlax.fully_shard(Block(nnx.Rngs(0)), mesh=mesh, per_device_random=True)
    assert nnx.jit(lambda u, x, k: u(x, k))(free, x, jax.random.key(1)).shape == (8, 4)


def test_a_unit_draw_shared_by_the_batch_is_the_one_device_draw():
    mesh = utils.mesh(data=2, fsdp=2)

    class Shared(Block):
        def __call__(self, x, key):
            h = self.lin(x)
            return h + jax.random.normal(key, (1, h.shape[1]))

    plain = Shared(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (8, 4))
    want = plain(x, jax.random.key(1))
    unit = shardlax.fully_shard(Shared(nnx.Rngs(0)), mesh=mesh)
    got = nnx.jit(lambda u, x, k: u(x, k))(unit, x, jax.random.key(1))
    utils.assert_close(got, want)
