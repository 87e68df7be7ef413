"""optax transforms on split parameters (fsdp units) and on replicated ones (dp).

Under fsdp each device runs `tx.update` on its shards of the split
parameters: elementwise transforms are exact there, and so is optax's global
norm (shardlax's hook); transforms that reduce over a parameter, read its
shape or draw noise of its shape were silently wrong before this check
(measured on the corpus MLP, fsdp=2: muon 1.5e-2, adafactor 9.4e-4,
adaptive_grad_clip 0.5, noisy_sgd 0.6 relative parameter error) and are now
refused when the Trainer is built. Under dp the state layout of masked /
partitioned transforms (optax.multi_transform, muon, sm3) is derived too.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import shardlax
from tests import utils
from tests.models import CORPUS, batches, host, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion


def _matrices(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


def _by_ndim(params):
    return jax.tree.map(lambda x: "matrix" if x.ndim > 1 else "vector", params)


EXACT = {
    "adamw_ndim_mask": lambda: optax.adamw(
        1e-2, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    ),
    "multi_transform": lambda: optax.multi_transform(
        {"matrix": optax.adam(1e-2), "vector": optax.sgd(1e-2)}, _by_ndim
    ),
    "clip_by_global_norm": lambda: optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(1e-2)),
}
REFUSED = {
    "muon": (lambda: optax.contrib.muon(1e-2), r"orthogonalize_via_newton_schulz|scale_by_muon"),
    "adafactor": (lambda: optax.adafactor(1e-2), r"clip_by_block_rms|factored"),
    "adaptive_grad_clip": (
        lambda: optax.chain(optax.adaptive_grad_clip(0.01), optax.sgd(1e-2)),
        r"adaptive_grad_clip",
    ),
    "noisy_sgd": (lambda: optax.noisy_sgd(1e-2, key=0), r"tree_add_scale"),
    "lars": (lambda: optax.lars(1e-2), r"scale_by_trust_ratio"),
}


def _train(model, tx, mesh, strategy, data):
    loss_fn = CORPUS["mlp"][2]
    trainer = shardlax.Trainer(model, tx, loss_fn, mesh=mesh, strategy=strategy)
    state = trainer.init()
    for batch in data:
        state, _ = trainer.step(state, batch)
    return host(nnx.state(trainer.model(state), nnx.Param))


def _assert_params(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(host(want)), strict=True):
        utils.assert_close(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_elementwise_transforms_on_fsdp_shards_equal_one_device(name):
    ctor, make_batch, loss_fn = CORPUS["mlp"]
    data = batches(make_batch, 8, 2)
    ref = one_device_reference(ctor, loss_fn, EXACT[name](), data)
    mesh = utils.mesh(1, 2, 1)
    got = _train(shardlax.fully_shard(ctor(), mesh=mesh), EXACT[name](), mesh, "fsdp", data)
    _assert_params(got, ref.params)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_transforms_not_exact_on_shards_are_refused_under_fsdp(name):
    make, pattern = REFUSED[name]
    ctor, _, loss_fn = CORPUS["mlp"]
    mesh = utils.mesh(1, 2, 1)
    with pytest.raises(
        ValueError,
        match=rf"Trainer\(strategy='fsdp', tx=\.\.\.\): optax\.({pattern}) is not exact on the "
        r"per-device parameter shards: .* \(logical shape -> per-device shape: ",
    ):
        shardlax.Trainer(
            shardlax.fully_shard(ctor(), mesh=mesh), make(), loss_fn, mesh=mesh, strategy="fsdp"
        )


@pytest.mark.parametrize("name", ["multi_transform", "muon", "sm3"])
def test_partitioned_and_factored_state_under_dp_equal_one_device(name):
    """Their optimizer state is masked (MaskedNode) or not parameter-shaped (sm3): its
    layout is derived, not assumed to follow the parameters."""
    make = {
        "multi_transform": EXACT["multi_transform"],
        "muon": lambda: optax.contrib.muon(1e-2),
        "sm3": lambda: optax.sm3(1e-2),
    }[name]
    ctor, make_batch, loss_fn = CORPUS["mlp"]
    data = batches(make_batch, 8, 2)
    ref = one_device_reference(ctor, loss_fn, make(), data)
    got = _train(ctor(), make(), utils.mesh(2, 1, 1), "dp", data)
    _assert_params(got, ref.params)
