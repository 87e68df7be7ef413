"""ZeRO-1/2 (and dp) with tensor-parallel shardlax layers: Megatron's distributed optimizer.

The Column -> Row MLP of tests/test_train_fsdp trains 5 AdamW steps (active
clipping) under dp, zero1 and zero2 on (data, fsdp, model) meshes exactly as
plain optax on one device, with the compiled collectives equal to the
declaration: gradients reduce-scattered over the data axes (zero2), TP
collectives over `model`, no parameter-sized all-reduce over the data axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from shardlax import audit, train
from tests import utils
from tests.test_train_fsdp import (
    MAX_NORM,
    TPMLP,
    B,
    adamw_clipped,
    full_weights,
    loss_fn,
    make_batch,
    model_collectives,
    reference_training,
)

pytestmark = pytest.mark.standard_dtype_promotion

ZERO_TP_MESHES = [(2, 1, 4), (4, 1, 2), (2, 2, 2)]


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "dp"])
@pytest.mark.parametrize("shape", ZERO_TP_MESHES, ids=str)
def test_zero_with_tp_matches_single_device(shape, strategy):
    if strategy == "dp" and shape != (2, 2, 2):
        pytest.skip("dp + TP: one mesh is enough")
    mesh = utils.mesh(*shape)
    ref, norms = reference_training(5, B)
    assert min(norms) > MAX_NORM, f"clipping is not active: {norms}"
    trainer = train.Trainer(TPMLP(mesh, nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy=strategy)  # fmt: skip
    state = trainer.init()
    for seed in range(5):
        state, _ = trainer.step(state, make_batch(seed))
    got = full_weights(trainer.model(state))
    for k in ref:
        utils.assert_close(got[k], ref[k], jnp.float32, f"{shape} {strategy} {k}")
    if strategy != "dp":
        # each Adam moment holds this device's flat 1/N of its local (model/fsdp) shard
        for p in trainer.placements:
            assert p.replicated == ("data",)
        flat = sum(p.flat_shard for p in trainer.placements) * 4
        assert trainer.state_bytes()["opt_state"] == 2 * flat + 4  # mu, nu + the count
        dense = sum(x.size for x in jax.tree.leaves(state.params)) * 4
        assert 2 * flat < 2 * dense / mesh.shape["data"] + 2 * 4 * len(trainer.placements)


@pytest.mark.parametrize("shape", [(2, 1, 4), (2, 2, 2)], ids=str)
def test_zero2_tp_compiles_to_declared_collectives(shape):
    mesh = utils.mesh(*shape)
    model = TPMLP(mesh, nnx.Rngs(0))
    declared_model = model_collectives(model)
    trainer = train.Trainer(model, adamw_clipped(), loss_fn, mesh=mesh, strategy="zero2")
    batch = make_batch(0)
    state = trainer.init()
    report = audit.collectives(trainer.step, state, batch)
    declared = trainer.declared_collectives(batch, model_collectives=declared_model)
    cmp = audit.compare(declared, report)
    assert cmp.ok, cmp.table()
    # gradients reduce-scattered over data; no parameter-sized all-reduce over data
    assert report.where("reduce-scatter", ("data",)).counts().total() >= 1, report.table()
    assert not [c for c in report.where("all-reduce", ("data",)) if c.bytes > 8], report.table()


def test_zero2_tp_step_compiles_once():
    mesh = utils.mesh(2, 1, 4)
    trainer = train.Trainer(TPMLP(mesh, nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2")  # fmt: skip
    state = trainer.init()
    with utils.count_compiles("_step") as compiles:
        for seed in range(5):
            state, _ = trainer.step(state, make_batch(seed))
    assert compiles.count == 1
