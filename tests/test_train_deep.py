"""Deep scanned models train like one device under every strategy (5 AdamW steps, clipping on).

The small-MLP equivalence lives in test_train.py / test_train_fsdp.py; these
are the deep, `lax.scan`-stacked models of the issue: a residual stack under
remat for dp / zero1 / zero2, and TinyLM (scanned blocks) for fsdp and
fsdp+tp. References are plain optax on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shardlax import audit, train
from shardlax.data import NGramLanguage
from shardlax.mesh import make_mesh
from shardlax.models import TinyLM, TinyLMConfig
from tests import utils
from tests.test_train import ScannedMLP, assert_params_close, loss_fn, make_batch

pytestmark = pytest.mark.standard_dtype_promotion

STEPS = 5
#: Clip thresholds below every step's gradient norm (asserted), so clipping is active.
MAX_NORM_STACK = 0.1
MAX_NORM_LM = 1.5
#: Adam's eps. TinyLM has gradient entries of ~2e-7 that are sums of cancelling terms, so
#: their last digits depend on the summation order (2.6% apart between one device and
#: fsdp=2 at step 0: f32 noise, not a sharding error). Clipped to ~8e-8, they sit near the
#: default eps=1e-8, where Adam's first update g / (|g| + eps) is a smooth function of g and
#: passes that noise on (3e-5 in the parameter). With eps far below every entry the first
#: updates depend on the gradients' signs, as Adam's do by design, and the comparison is
#: well conditioned at the one f32 tolerance.
ADAM_EPS = 1e-12


def _tx(max_norm: float):
    return utils.adamw_clipped(max_norm, eps=ADAM_EPS)


def _reference(model: nnx.Module, batches, loss, max_norm: float):
    """Plain optax on one device: final params and every step's gradient norm."""
    tx = _tx(max_norm)
    graphdef, params = nnx.split(model, nnx.Param)
    rest = nnx.state(model, nnx.Not(nnx.Param))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, optax.tree.norm(grads)

    norms = []
    for batch in batches:
        params, opt, norm = step(params, opt, batch)
        norms.append(float(norm))
    assert min(norms) > max_norm, f"clipping must be active: gradient norms {norms}"
    return params


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2"])
def test_scanned_stack_trains_like_one_device(strategy, n):
    mesh = utils.mesh(data=n)
    batches = [make_batch(16, seed) for seed in range(STEPS)]
    expected = _reference(ScannedMLP(nnx.Rngs(0)), batches, loss_fn, MAX_NORM_STACK)
    tx = _tx(MAX_NORM_STACK)
    trainer = train.Trainer(ScannedMLP(nnx.Rngs(0)), tx, loss_fn, mesh=mesh, strategy=strategy)
    state = trainer.init()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    assert_params_close(state.params, expected, f"scanned {strategy} on {n} devices")


def _lm_loss(model, batch):
    return model.loss(batch["x"], batch["y"])


@pytest.mark.parametrize(
    "strategy, shape, sp",
    [
        ("fsdp", (1, 2, 1), False),
        ("fsdp", (1, 4, 1), False),
        ("fsdp+tp", (2, 2, 2), False),
        # ZeRO-1/2 with tensor parallelism (Megatron's distributed optimizer), and SP
        ("zero2", (2, 1, 4), False),
        ("zero1", (4, 1, 2), True),
        ("zero2", (2, 2, 2), True),
    ],
    ids=str,
)
def test_tinylm_trains_like_one_device(strategy, shape, sp):
    data, fsdp, model = shape
    mesh = utils.mesh(data=data, fsdp=fsdp, model=model)
    cfg = TinyLMConfig(vocab=32, d_model=32, n_layers=3, n_heads=4, d_ff=64, seq_len=8, remat=True,
                       sequence_parallel=sp)  # fmt: skip
    lang = NGramLanguage(vocab=32, seed=0)
    batches = []
    for step in range(STEPS):
        x, y = lang.batch(8, 8, step=step)
        batches.append({"x": jnp.asarray(x), "y": jnp.asarray(y)})
    one = make_mesh(devices=jax.devices()[:1])
    expected = _reference(TinyLM(cfg, mesh=one, rngs=nnx.Rngs(0)), batches, _lm_loss, MAX_NORM_LM)

    lm = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    trainer = train.Trainer(lm, _tx(MAX_NORM_LM), _lm_loss, mesh=mesh, strategy=strategy)
    state = trainer.init()
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    got = nnx.to_pure_dict(state.params)
    want = nnx.to_pure_dict(expected)
    assert_params_close(got, want, f"TinyLM {strategy} on {shape}")
    # the parameters stay split over the fsdp axis: each device holds 1/fsdp of the table
    table = state.params["embed"]["embedding"][...]
    assert table.addressable_shards[0].data.size == table.size // (fsdp * model)
    # and the step moves only what the layers and the trainer declare
    declared = trainer.declared_collectives(
        batches[0],
        model_collectives=lm.declared_collectives((8, 8), grad=True),
        loss_in_model=True,
    )
    comparison = audit.compare(declared, audit.collectives(trainer.step, state, batches[0]))
    assert comparison.ok, comparison.table()
