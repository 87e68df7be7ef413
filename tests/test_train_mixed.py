"""shardlax.train zero1/zero2 with a mixed-precision policy: bf16 replicated parameters
(computed with and all-gathered in bf16), f32 gradient reduction, f32 master shards.

The reference is the same policy written with plain optax on one device: f32 master
parameters, their bf16 copy for the loss, bf16 gradients cast to f32 for adamw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from shardlax import audit, train
from shardlax.precision import MixedPrecision
from tests import utils
from tests.test_train import MLP, adamw_clipped, loss_fn, make_batch

pytestmark = pytest.mark.standard_dtype_promotion

POLICY = MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)


def reference_mixed(batches):
    graphdef, master = nnx.split(MLP(nnx.Rngs(0)))
    tx = adamw_clipped()
    opt = tx.init(master)

    @jax.jit
    def step(master, opt, batch):
        low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), master)
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(low)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt = tx.update(grads, opt, master)
        return optax.apply_updates(master, updates), opt

    for batch in batches:
        master, opt = step(master, opt, batch)
    return master


@pytest.mark.parametrize(("strategy", "n", "accum"), [("zero2", 4, 1), ("zero1", 8, 2)])
def test_mixed_precision_training(strategy, n, accum):
    mesh = utils.mesh(data=n)
    batches = [make_batch(16, seed) for seed in range(3)]
    ref = reference_mixed(batches)
    trainer = train.Trainer(
        MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh, strategy=strategy,
        accum_steps=accum, mixed_precision=POLICY,
    )  # fmt: skip
    state = trainer.init()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    master = trainer.full_params(state)
    for a, b in zip(jax.tree.leaves(master), jax.tree.leaves(ref), strict=True):
        assert a.dtype == jnp.float32
        utils.assert_close(a, b, jnp.bfloat16, "f32 master after 3 bf16 steps")
    # the replicated copy is exactly the master rounded to bf16
    for low, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(master), strict=True):
        assert low.dtype == jnp.bfloat16
        assert bool(jnp.all(low == m.astype(jnp.bfloat16)))


def test_mixed_precision_collectives_and_bytes():
    """bf16 all-gather (as u16 bits) moves half the bytes of the f32 reduce-scatter."""
    n = 8
    mesh = utils.mesh(data=n)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2", mixed_precision=POLICY)  # fmt: skip
    # one description per parameter: stored f32, gathered and computed in bf16, reduced in f32
    for p in trainer.placements:
        assert (p.dtype, p.compute_dtype, p.reduce_dtype) == (jnp.float32, jnp.bfloat16,
                                                              jnp.float32)  # fmt: skip
        assert p.state_struct().dtype == jnp.float32 and p.state_struct().shape == p.flat_shape
    state, batch = trainer.init(), make_batch(16)
    report = audit.collectives(trainer.step, state, batch)
    cmp = audit.compare(trainer.declared_collectives(batch), report)
    assert cmp.ok, cmp.table()
    gathers, scatters = report.where("all-gather"), report.where("reduce-scatter")
    assert {c.dtype for c in gathers} == {"u16"} and {c.dtype for c in scatters} == {"f32"}
    padded = sum(n * -(-s // n) for s in (60, 10, 30, 3))  # 120 elements
    assert sum(c.bytes for c in scatters) == padded * 4
    assert sum(c.bytes for c in gathers) == padded * 2
    by = trainer.state_bytes()
    assert by["params"] == 103 * 2  # bf16, replicated
    assert by["master"] == padded * 4 // n  # f32, 1/N


def test_mixed_precision_needs_zero():
    mesh = utils.mesh(data=2)
    with pytest.raises(ValueError, match=r"strategy='dp', mixed_precision=.*zero1/zero2"):
        train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh, strategy="dp",
                      mixed_precision=POLICY)  # fmt: skip
    with pytest.raises(TypeError, match=r"mixed_precision='bf16'.*MixedPrecision"):
        train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh,
                      mixed_precision="bf16")  # fmt: skip
