"""Every model of tests/models trains under dp, zero1 and zero2 exactly as on one device.

3 AdamW steps with active clipping: per-step losses, final parameters and the
final non-parameter state (BatchNorm statistics, RNG counts and keys, counters,
running means) against plain nnx + optax on one device. The CNN's and the
rngs-at-call model's nnx.Dropout masks are the one-device masks (bit for bit),
so their runs are compared with the dropout active.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import shardlax
from tests import utils
from tests.models import CORPUS, batches, host, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion

N_STEPS = 3
BATCH = 16
MAX_NORM = 1e-3  # below every gradient norm of the corpus: clipping is active


def tx():
    return utils.adamw_clipped(MAX_NORM)


@functools.cache
def reference(name: str):
    ctor, make_batch, loss_fn = CORPUS[name]
    data = batches(make_batch, BATCH, N_STEPS)
    return one_device_reference(ctor, loss_fn, tx(), data), data


#: every model under every strategy, on 2, 4 and 8 devices between them
RUNS = [
    (name, strategy, n)
    for i, name in enumerate(CORPUS)
    for strategy, n in [
        ("dp", (2, 4, 8)[i % 3]),
        ("zero1", (4, 8, 2)[i % 3]),
        ("zero2", (8, 2, 4)[i % 3]),
    ]
]


def state_reduction(name):
    return "mean" if name == "counter" else None


def compare_trees(got, want, what):
    got_flat = jax.tree_util.tree_flatten_with_path(host(got))[0]
    want_flat = jax.tree_util.tree_flatten_with_path(host(want))[0]
    assert [p for p, _ in got_flat] == [p for p, _ in want_flat], what
    for (path, g), (_, w) in zip(got_flat, want_flat, strict=True):
        where = f"{what} {jax.tree_util.keystr(path)}"
        if np.issubdtype(w.dtype, np.floating):
            utils.assert_close(g, w, err_msg=where)
        else:
            np.testing.assert_array_equal(g, w, err_msg=where)


@pytest.mark.parametrize(("name", "strategy", "n"), RUNS, ids=lambda v: str(v))
def test_corpus_trains_like_one_device(name, strategy, n):
    mesh = utils.mesh(data=n)
    ref, data = reference(name)
    assert min(ref.grad_norms) > MAX_NORM, ref.grad_norms
    ctor, _, loss_fn = CORPUS[name]
    trainer = shardlax.Trainer(ctor(), tx(), loss_fn, mesh=mesh, strategy=strategy,
                               state_reduction=state_reduction(name))  # fmt: skip
    state = trainer.init()
    losses = []
    with utils.count_compiles("_step") as compiles:
        for batch in data:
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
    assert compiles.count == 1, f"the step compiled {compiles.count} times in {N_STEPS} steps"
    utils.assert_close(np.array(losses), np.array(ref.losses), err_msg=f"{name} losses")
    model = trainer.model(state)
    compare_trees(nnx.state(model, nnx.Param), ref.params, f"{name} params")
    compare_trees(nnx.state(model, nnx.Not(nnx.Param)), ref.rest, f"{name} state")
