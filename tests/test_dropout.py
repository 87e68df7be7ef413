"""Dropout masks are bit-identical on every mesh, under every layout, and equal nnx.Dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from tests import utils

#: The reference is the unsharded draw, so every mesh here is compared with one device.
MESHES = [(2, 2, 2), (1, 1, 8), (8, 1, 1), (2, 1, 4)]
SHAPE = (8, 16, 8)


def live_entry(mesh, axes):
    """A PartitionSpec entry naming the axes of `axes` whose size is > 1 (None if none)."""
    live = tuple(a for a in axes if mesh.shape[a] > 1)
    return None if not live else live if len(live) > 1 else live[0]


def reference(x, key, rate, broadcast_dims=()):
    """`jax.random.bernoulli` on the whole (unsharded) array, as single-device dropout draws it."""
    shape = list(x.shape)
    for d in broadcast_dims:
        shape[d] = 1
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, tuple(shape)))
    keep = np.broadcast_to(keep, x.shape)
    scaled = np.asarray(x / jnp.float32(1.0 - rate))  # XLA's division (numpy's may differ by 1 ulp)
    return np.where(keep, scaled, np.float32(0.0)), keep


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_dropout_bit_identical_on_every_mesh(mesh_shape):
    mesh = utils.mesh(*mesh_shape)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    key = jax.random.key(42)
    expected, _ = reference(x, key, 0.3)
    flax_out = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=7))(x)
    for sp in (False, True):
        layer = shardlax.nn.Dropout(0.3, mesh=mesh, sequence_parallel=sp)
        out = nnx.jit(lambda m, x: m(x, rngs=key))(layer, x)
        utils.assert_sharding(out, mesh, layer.hidden_spec(3))
        np.testing.assert_array_equal(np.asarray(out), expected, err_msg=f"sp={sp}")
    # with its own rng stream, it draws the key nnx.Dropout draws
    ours = shardlax.nn.Dropout(0.3, mesh=mesh, sequence_parallel=True, rngs=nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(ours, x)), flax_out)
    # any layout, e.g. features split over 'model' and the sequence over the batch axes
    layer = shardlax.nn.Dropout(0.3, mesh=mesh)
    spec = P(None, live_entry(mesh, ("data", "fsdp")), live_entry(mesh, ("model",)))
    out = nnx.jit(lambda m, x: m(x, rngs=key, spec=spec))(layer, x)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_broadcast_dims_and_gradient():
    mesh = utils.mesh(2, 1, 4)
    x = jax.random.normal(jax.random.key(1), SHAPE)
    key = jax.random.key(3)
    layer = shardlax.nn.Dropout(0.5, broadcast_dims=(1,), mesh=mesh, sequence_parallel=True)
    out = nnx.jit(lambda m, x: m(x, rngs=key))(layer, x)
    expected, keep = reference(x, key, 0.5, broadcast_dims=(1,))
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert (keep == keep[:, :1, :]).all()  # one mask value along the broadcast dim
    grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x, rngs=key)), argnums=1))(layer, x)
    np.testing.assert_array_equal(np.asarray(grad), np.where(keep, np.float32(2.0), 0.0))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (2, 1, 4)], ids=str)
def test_dropout_moves_no_data(mesh_shape):
    mesh = utils.mesh(*mesh_shape)
    layer = shardlax.nn.Dropout(0.1, mesh=mesh, sequence_parallel=True)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    step = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x, rngs=jax.random.key(0)) ** 2), argnums=1))
    assert len(audit.collectives(step, layer, x, mesh=mesh)) == 0


def test_passthrough_and_errors():
    mesh = utils.mesh(1, 1, 4)
    x = jnp.ones((4, 8, 2))
    assert shardlax.nn.Dropout(0.0, mesh=mesh)(x) is x
    assert shardlax.nn.Dropout(0.5, mesh=mesh, deterministic=True)(x) is x
    assert float(jnp.sum(shardlax.nn.Dropout(1.0, mesh=mesh)(x))) == 0.0
    with pytest.raises(ValueError, match=r"Dropout\(rate=1.5\): rate must be in \[0, 1\]"):
        shardlax.nn.Dropout(1.5, mesh=mesh)
    with pytest.raises(ValueError, match=r"Dropout: no `deterministic` given"):
        shardlax.nn.Dropout(0.5, mesh=mesh, deterministic=None)(x)
    with pytest.raises(ValueError, match=r"Dropout: `deterministic` is False, but no `rngs`"):
        shardlax.nn.Dropout(0.5, mesh=mesh)(x)  # ValueError, as nnx.Dropout
    with pytest.raises(TypeError, match=r"Dropout: `deterministic` is False but no rngs were"):
        shardlax.nn.Dropout(0.5, mesh=mesh)(x, rngs=3)
    with pytest.raises(ValueError, match=r"Dropout\(sequence_parallel=True\): inputs.shape\[1\]=6"):
        shardlax.nn.Dropout(0.5, mesh=mesh, sequence_parallel=True)(
            jnp.ones((4, 6, 2)), rngs=jax.random.key(0)
        )
