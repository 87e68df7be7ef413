"""`fully_shard` units built abstractly (`nnx.eval_shape`) keep their placement on every mesh
kind, so compile-only studies (`Trainer.abstract_state`, `shardlax.budget`) see the FSDP layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import shardlax
from tests import utils

pytestmark = pytest.mark.standard_dtype_promotion


class Net(nnx.Module):
    def __init__(self, mesh, rngs):
        self.blocks = nnx.List(
            [shardlax.fully_shard(nnx.Linear(16, 16, rngs=rngs), mesh=mesh) for _ in range(2)]
        )
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = jnp.tanh(b(x))
        return self.head(x)


def loss_fn(model, batch):
    return jnp.mean((model(batch[0]) - batch[1]) ** 2)


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_abstract_fully_shard_model_keeps_its_placement(axis_types):
    utils.need_devices(4)
    mesh = utils.mesh(fsdp=4, axis_types=axis_types)
    concrete = Net(mesh, nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: Net(mesh, nnx.Rngs(0)))
    want = [x.sharding.spec for x in jax.tree.leaves(nnx.state(concrete.blocks, nnx.Param))]
    got = [x.sharding.spec for x in jax.tree.leaves(nnx.state(abstract.blocks, nnx.Param))]
    assert got == want and P_FSDP in got
    trainer = shardlax.Trainer(abstract, optax.adam(1e-3), loss_fn, mesh=mesh, strategy="fsdp")
    batch = (jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((8, 3), jnp.float32))
    trainer.step.lower(trainer.abstract_state(), batch).compile()


P_FSDP = jax.P("fsdp", None)
