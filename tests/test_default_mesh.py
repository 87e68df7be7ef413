"""The FSDP2 pattern on `shardlax.make_mesh`'s default mesh, in the user's own `nnx.jit` loop.

Each block `fully_shard`ed; the embedding and the tied head (`embedder.attend`)
plain `nnx.Embed`, the final norm plain `nnx.RMSNorm`; the batch split over
`('data', 'fsdp')`; AdamW with active clipping through `nnx.Optimizer`. Flax
code outside the units is unmodified, so it must run on the default mesh as
GSPMD code (an `nnx.Embed` lookup on batch-sharded ids raised
`ShardingTypeError` on Explicit axes). The reference is the same model on
one device with plain nnx + optax (`tests.models.one_device_reference`).
On an Explicit mesh (`axis_types="explicit"`) the plain lookup still raises
JAX's error and wrapping the embedding is the recipe
(`tests/test_fsdp_units.py::test_fsdp2_pattern_on_the_default_explicit_mesh`).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from tests import utils
from tests.models import CORPUS, batches, logical, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion

N_STEPS, BATCH, MAX_NORM = 3, 8, 1e-3


def _ctor(name):
    """The corpus model with one block (one unit: the pattern, at the least compile time)."""
    return functools.partial(CORPUS[name][0], num_layers=1)


@functools.cache
def _reference(name):
    _, make_batch, loss_fn = CORPUS[name]
    data = batches(make_batch, BATCH, N_STEPS)
    return one_device_reference(_ctor(name), loss_fn, utils.adamw_clipped(MAX_NORM), data), data


def test_default_mesh_is_auto():
    utils.need_devices(4)
    mesh = shardlax.make_mesh(data=2, fsdp=2)
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_fsdp2_pattern_in_a_user_jit_loop_on_the_default_mesh():
    utils.need_devices(4)
    name = "decoder_linear"
    ref, data = _reference(name)
    _, _, loss_fn = CORPUS[name]
    mesh = shardlax.make_mesh(data=2, fsdp=2)  # the default axis types
    model = _ctor(name)()
    for i in range(len(model.layers)):
        model.layers[i] = shardlax.fully_shard(model.layers[i], mesh=mesh)
    assert isinstance(model.embedder, nnx.Embed)  # plain flax outside the units
    optimizer = nnx.Optimizer(model, utils.adamw_clipped(MAX_NORM), wrt=nnx.Param)
    # the plain layers' parameters and the optimizer state start on one device; jit returns
    # them replicated over the mesh, so place them there first: one compile for every step
    state = nnx.state((model, optimizer))
    on_one = lambda x: isinstance(x.sharding, jax.sharding.SingleDeviceSharding)
    replicated = NamedSharding(mesh, P())
    nnx.update(
        (model, optimizer),
        jax.tree.map(lambda x: jax.device_put(x, replicated) if on_one(x) else x, state),
    )

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss, optax.tree.norm(grads)

    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    losses, norms = [], []
    with utils.count_compiles("step") as compiles:
        for batch in data:
            loss, norm = step(model, optimizer, jax.device_put(batch, batch_sharding))
            losses.append(float(loss))
            norms.append(float(norm))
    assert compiles.count == 1
    utils.assert_close(np.array(losses), np.array(ref.losses))
    utils.assert_close(np.array(norms), np.array(ref.grad_norms))
    assert min(ref.grad_norms) > MAX_NORM  # the clipping was active
    got, want = logical(nnx.state(model, nnx.Param)), logical(ref.params)
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        utils.assert_close(got[k], w, err_msg=k)
    # the units still hold 1/N of their parameters
    kernel = model.layers[0]
    leaves = jax.tree.leaves(nnx.state(kernel, nnx.Param))
    assert any(x.addressable_shards[0].data.size * mesh.shape["fsdp"] == x.size for x in leaves)
