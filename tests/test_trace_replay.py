"""Identical `fully_shard` units are traced once and replayed (`shardlax._trace_cache`).

The replay must be invisible: the same loss, gradients, state updates and
compiled collectives as tracing every unit, which itself equals the plain
model on one device. What the trace reads besides input values (shapes,
dtypes, the unit's config, JAX's config such as dtype promotion) starts a new
trace; a call whose key cannot be formed is traced as before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import _trace_cache, audit
from shardlax.fsdp import fully_shard
from tests import utils

pytestmark = pytest.mark.standard_dtype_promotion


class Block(nnx.Module):
    def __init__(self, d, rngs, rate=0.0):
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)
        self.drop = nnx.Dropout(rate, rngs=rngs) if rate else None

    def __call__(self, x, scale=None):
        h = jax.nn.gelu(self.up(x))
        if self.drop is not None:
            h = self.drop(h)
        y = x + self.down(h)
        return y if scale is None else y * scale.factor


class Stack(nnx.Module):
    def __init__(self, widths, rngs, rate=0.0):
        self.blocks = nnx.List([Block(d, rngs, rate) for d in widths])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


def _run(model, x):
    """(loss, grads, the model's state after the step) of one nnx.jit value_and_grad."""

    @nnx.jit
    def step(model, x):
        return nnx.value_and_grad(_loss)(model, x)

    loss, grads = step(model, x)
    return float(loss), _host(grads), nnx.state(model)


def _wrapped(widths, mesh, rate=0.0):
    model = Stack(widths, nnx.Rngs(0), rate)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return model


@pytest.fixture
def no_replay(monkeypatch):
    """Every unit call traced (no key: the behaviour before the replay)."""

    def disable():
        monkeypatch.setattr(_trace_cache, "_trace_context", None)

    return disable


def _stats():
    _trace_cache.clear()
    return dict(_trace_cache.stats)


def _delta(before):
    return {k: _trace_cache.stats[k] - before[k] for k in before}


def test_identical_units_are_traced_once_and_equal_tracing_each(no_replay):
    mesh = utils.mesh(1, 4, 1, axis_types="auto")
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (8, 16)), NamedSharding(mesh, P("fsdp"))
    )
    before = _stats()
    replayed = _run(_wrapped([16] * 6, mesh), x)
    assert _delta(before) == {"traced": 1, "replayed": 5}
    compiled = jax.jit(jax.grad(_loss)).lower(_wrapped([16] * 6, mesh), x).compile()
    kinds = sorted(c.kind for c in audit.collectives(compiled))

    no_replay()
    before = _stats()
    traced = _run(_wrapped([16] * 6, mesh), x)
    assert _delta(before) == {"traced": 6, "replayed": 0}
    compiled = jax.jit(jax.grad(_loss)).lower(_wrapped([16] * 6, mesh), x).compile()
    assert sorted(c.kind for c in audit.collectives(compiled)) == kinds
    # 6 blocks x (2 kernels gathered twice + 2 biases once), less the first kernel's
    # re-gather (no input gradient: its backward does not read it); 4 reduce-scatters each
    assert kinds.count("all-gather") == 35 and kinds.count("reduce-scatter") == 24

    assert replayed[0] == traced[0]  # bit for bit: the same equations
    jax.tree.map(np.testing.assert_array_equal, replayed[1], traced[1])

    plain = Stack([16] * 6, nnx.Rngs(0))
    loss, grads = nnx.value_and_grad(_loss)(plain, np.asarray(x))
    utils.assert_close(replayed[0], loss)
    jax.tree.map(utils.assert_close, replayed[1], utils.to_numpy(nnx.to_pure_dict(grads)))


def test_units_with_own_rngs_advance_their_own_state_when_replayed(no_replay):
    mesh = utils.mesh(1, 2, 1, axis_types="auto")
    x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("fsdp")))
    before = _stats()
    replayed = _run(_wrapped([8] * 3, mesh, rate=0.5), x)
    assert _delta(before)["replayed"] == 2
    no_replay()
    traced = _run(_wrapped([8] * 3, mesh, rate=0.5), x)
    assert replayed[0] == traced[0]
    jax.tree.map(np.testing.assert_array_equal, replayed[1], traced[1])
    jax.tree.map(np.testing.assert_array_equal, _host(replayed[2]), _host(traced[2]))
    counts = [int(v) for p, v in nnx.to_flat_state(replayed[2]) if p[-1] == "count"]
    assert counts == [1, 1, 1]  # every unit's dropout stream advanced once, each its own


def _host(state):
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, nnx.to_pure_dict(state))


def test_what_the_trace_reads_starts_a_new_trace():
    mesh = utils.mesh(1, 2, 1, axis_types="auto")
    before = _stats()
    model = _wrapped([8, 16, 8, 16], mesh)  # two distinct widths: two traces

    @nnx.jit
    def fwd(model, x):
        return model.blocks[0](x), model.blocks[2](x), model.blocks[1](jnp.tile(x, 2))

    x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("fsdp")))
    fwd(model, x)
    assert _delta(before) == {"traced": 2, "replayed": 1}

    unit = model.blocks[0]
    call = nnx.jit(lambda m, x: m(x))
    before = dict(_trace_cache.stats)
    call(unit, x.astype(jnp.bfloat16))  # another input dtype
    with jax.numpy_dtype_promotion("strict"):  # another JAX config: jit's own key
        nnx.jit(lambda m, x: m(x))(unit, x)
    assert _delta(before) == {"traced": 2, "replayed": 0}


class Unhashable:
    __hash__ = None

    def __init__(self, factor):
        self.factor = factor


def test_a_call_with_an_unhashable_static_argument_is_traced_each_time():
    mesh = utils.mesh(1, 2, 1, axis_types="auto")
    model = _wrapped([8, 8], mesh)
    x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("fsdp")))

    @nnx.jit
    def fwd(model, x):
        return model.blocks[1](model.blocks[0](x, Unhashable(2.0)), Unhashable(3.0))

    before = _stats()
    got = fwd(model, x)
    assert _delta(before) == {"traced": 2, "replayed": 0}
    plain = Stack([8, 8], nnx.Rngs(0))
    want = plain.blocks[1](plain.blocks[0](np.ones((4, 8)), Unhashable(2.0)), Unhashable(3.0))
    utils.assert_close(got, want)
