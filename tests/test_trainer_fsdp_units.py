"""Corpus models with `fully_shard` units (FSDP2's pattern) train through the Trainer as on
one device: per block, nested (blocks then the root) and whole-model, under fsdp (and
zero2 over `data` on top of fsdp units over `fsdp`)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

import shardlax
from tests import utils
from tests.models import CORPUS, batches, logical, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion

N_STEPS = 3
BATCH = 16
MAX_NORM = 1e-3


def tx():
    return utils.adamw_clipped(MAX_NORM)


@functools.cache
def reference(name: str):
    ctor, make_batch, loss_fn = CORPUS[name]
    data = batches(make_batch, BATCH, N_STEPS)
    return one_device_reference(ctor, loss_fn, tx(), data), data


def wrap(model, how, mesh, state_reduction=None):
    if how in ("per_block", "nested"):
        for i in range(len(model.layers)):
            model.layers[i] = shardlax.fully_shard(model.layers[i], mesh=mesh)
    if how in ("nested", "whole"):
        model = shardlax.fully_shard(model, mesh=mesh, state_reduction=state_reduction)
    return model


def compare(got, want, what):
    got, want = logical(got), logical(want)
    assert sorted(got) == sorted(want), what
    for k, w in want.items():
        if np.issubdtype(w.dtype, np.floating):
            utils.assert_close(got[k], w, err_msg=f"{what} {k}")
        else:
            np.testing.assert_array_equal(got[k], w, err_msg=f"{what} {k}")


CASES = [
    ("decoder", "per_block", "fsdp", (1, 2, 1)),
    ("decoder", "nested", "fsdp", (2, 2, 1)),
    ("decoder_linear", "whole", "fsdp", (1, 4, 1)),
    ("cnn", "whole", "fsdp", (1, 2, 1)),
    ("mlp", "whole", "fsdp", (2, 2, 1)),
    ("decoder", "per_block", "zero2", (2, 2, 1)),
    # the rest of the corpus, and 8 devices
    ("decoder_linear", "per_block", "fsdp", (1, 8, 1)),
    ("decoder", "nested", "fsdp", (2, 4, 1)),
    ("vit", "whole", "fsdp", (1, 8, 1)),
    # its running mean: Trainer(state_reduction='mean'), which the unit inherits
    ("counter", "whole", "fsdp", (1, 4, 1)),
    ("rngs_at_call", "whole", "fsdp", (2, 4, 1)),
    ("cnn", "whole", "fsdp", (4, 2, 1)),
    # flax's nnx.RNN and the model's own fori_loop / cond / scan with constant carries
    ("recurrent", "whole", "fsdp", (2, 2, 1)),
    ("recurrent", "whole", "zero2", (1, 4, 1)),
]


@pytest.mark.parametrize(("name", "how", "strategy", "shape"), CASES, ids=str)
def test_fully_shard_units_train_like_one_device(name, how, strategy, shape):
    mesh = utils.mesh(*shape)
    ref, data = reference(name)
    ctor, _, loss_fn = CORPUS[name]
    model = wrap(ctor(), how, mesh)
    reduction = "mean" if name == "counter" else None
    trainer = shardlax.Trainer(
        model, tx(), loss_fn, mesh=mesh, strategy=strategy, state_reduction=reduction
    )
    assert any("fsdp" in str(p.spec) for p in trainer.placements)
    state = trainer.init()
    losses = []
    with utils.count_compiles("_step") as compiles:
        for batch in data:
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
    assert compiles.count == 1
    utils.assert_close(np.array(losses), np.array(ref.losses), err_msg=f"{name} losses")
    trained = trainer.model(state)
    compare(nnx.state(trained, nnx.Param), ref.params, f"{name} params")
    compare(nnx.state(trained, nnx.Not(nnx.Param)), ref.rest, f"{name} state")
