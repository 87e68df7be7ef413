"""Dropout behaves as nnx.Dropout where flax's own tests look: nnx.view, errors, no retrace."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from tests import utils


def test_constructor_and_call_accept_every_flax_argument():
    for ours, theirs in [(shardlax.nn.Dropout.__init__, nnx.Dropout.__init__),
                         (shardlax.nn.Dropout.__call__, nnx.Dropout.__call__)]:  # fmt: skip
        mine = inspect.signature(ours).parameters
        for name, p in inspect.signature(theirs).parameters.items():
            assert name in mine, name
            assert mine[name].kind == p.kind, name
            assert mine[name].default == p.default, name


class Block(nnx.Module):
    def __init__(self, mesh):
        self.drop = shardlax.nn.Dropout(0.5, mesh=mesh, rngs=nnx.Rngs(dropout=0))

    def __call__(self, x):
        return self.drop(x)


def test_nnx_view_sets_deterministic():
    mesh = utils.mesh(1, 1, 2)
    model = Block(mesh)
    x = jnp.ones((2, 4, 8))
    assert not np.array_equal(np.asarray(model(x)), np.asarray(x))  # drops
    view = nnx.view(model, deterministic=True)
    assert view(x) is x
    assert model.drop.deterministic is False  # the view is a copy; the model keeps dropping


def test_errors_have_flax_types():
    mesh = utils.mesh(1, 1, 2)
    x = jnp.ones((2, 4, 8))
    for layer in (nnx.Dropout(0.5), shardlax.nn.Dropout(0.5, mesh=mesh)):
        with pytest.raises(ValueError, match="no `rngs` argument was provided"):
            layer(x)
        with pytest.raises(ValueError):
            layer.__class__(0.5, deterministic=None, **({} if isinstance(layer, nnx.Dropout)
                            else {"mesh": mesh}))(x)  # fmt: skip
        with pytest.raises(TypeError):
            layer.__class__(0.5, rngs=3, **({} if isinstance(layer, nnx.Dropout)
                            else {"mesh": mesh}))  # fmt: skip


def test_second_nnx_jit_call_does_not_retrace():
    mesh = utils.mesh(2, 1, 2)
    model = Block(mesh)
    traces = []

    @nnx.jit
    def f(model, x):
        traces.append(1)
        return model(x)

    x = jax.device_put(
        jnp.ones((2, 4, 8)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    a = f(model, x)
    b = f(model, x)
    f(model, x)
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the stream advanced


@pytest.mark.parametrize("model_axis", [1, 2])
def test_call_time_rngs_made_on_the_mesh_do_not_retrace(model_axis):
    """flax's `dropout_internal_rngs` sequence, with the call-time rngs made under
    `jax.set_mesh`: module rngs and call-time rngs give the same masks, two traces in all."""
    mesh = utils.mesh(model=model_axis, axis_types="auto")
    traces = []

    @nnx.jit
    def f(m, x, rngs=None):
        traces.append(1)
        return m(x, rngs=rngs)

    with jax.set_mesh(mesh):
        owned = shardlax.nn.Dropout(0.5, deterministic=False, rngs=nnx.Rngs(dropout=0))
        bare = shardlax.nn.Dropout(0.5, deterministic=False)
        rngs = nnx.Rngs(dropout=0).fork()
        x = jnp.ones((1, 10))
        for step in (1, 2):
            a = f(owned, x)
            b = f(bare, x, rngs=rngs)
            assert int(owned.rngs.count[...]) == step and int(rngs.dropout.count[...]) == step
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(traces) == 2
