"""ParallelMLP (gelu, SwiGLU) equals plain jnp, forward and gradients, TP and SP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import shardlax
from shardlax import audit
from tests import utils

MESHES = utils.LAYER_MESHES


def reference_mlp(x, w1, b1, w2, b2, wg, bg, activation):
    """Plain jnp on full arrays."""
    h = x @ w1 + b1[None, None, :]
    if activation == "swiglu":
        g = x @ wg + bg[None, None, :]
        h = g * jax.nn.sigmoid(g) * h
    else:
        c = np.sqrt(2 / np.pi)
        h = 0.5 * h * (1 + jnp.tanh(c * (h + 0.044715 * h**3)))  # gelu, tanh form
    return h @ w2 + b2[None, None, :]


def _params(layer):
    get = lambda p: jnp.asarray(np.asarray(p[...]))
    gate = layer.gate
    gk, gb = (None, None) if gate is None else (get(gate.kernel), get(gate.bias))
    return (
        get(layer.up.kernel),
        get(layer.up.bias),
        get(layer.down.kernel),
        get(layer.down.bias),
        gk,
        gb,
    )


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@utils.examples(2)  # each example compiles several sharded programs
@given(data=st.data())
def test_mlp_matches_reference(mesh_shape, data):
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    sp = data.draw(st.booleans(), label="sequence_parallel")
    act = data.draw(st.sampled_from(["gelu", "swiglu"]))
    dim, hidden = f * 4 * data.draw(st.integers(1, 2)), m * f * 4 * data.draw(st.integers(1, 2))
    batch, seq = d * f * data.draw(st.integers(1, 2)), m * data.draw(st.integers(1, 2))
    seed = data.draw(st.integers(0, 2**16))
    layer = shardlax.nn.ParallelMLP(dim, hidden, activation=act, mesh=mesh, rngs=nnx.Rngs(seed),
                                    sequence_parallel=sp)  # fmt: skip
    utils.randomize_biases([layer.up, layer.gate, layer.down], seed)
    k = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(k[0], (batch, seq, dim))
    cot = jax.random.normal(k[1], (batch, seq, dim))
    w1, b1, w2, b2, wg, bg = _params(layer)

    y = nnx.jit(lambda m, x: m(x))(layer, x)
    utils.assert_sharding(y, mesh, layer.hidden_spec(3))
    utils.assert_close(y, reference_mlp(x, w1, b1, w2, b2, wg, bg, act), err_msg="forward")

    grads, dx = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1)))(layer, x)
    names = [("up", "kernel"), ("up", "bias"), ("down", "kernel"), ("down", "bias")]
    args = [w1, b1, w2, b2]
    if act == "swiglu":
        names += [("gate", "kernel"), ("gate", "bias")]
        args += [wg, bg]

    def ref_loss(x, *p):
        full = list(p) + [None, None] * (act != "swiglu")
        return jnp.sum(reference_mlp(x, *full, act) * cot)

    rg = jax.grad(ref_loss, argnums=tuple(range(len(args) + 1)))(x, *args)
    utils.assert_close(dx, rg[0], err_msg="dx")
    for (mod, p), g in zip(names, rg[1:], strict=True):
        utils.assert_close(grads[mod][p][...], g, err_msg=f"d {mod}.{p}")


def test_mlp_init_matches_flax_linears():
    """up, gate, down hold the values of nnx.Linear built in that order from the same rngs."""
    mesh = utils.mesh(1, 1, 4)
    layer = shardlax.nn.ParallelMLP(8, 16, activation="swiglu", mesh=mesh, rngs=nnx.Rngs(3))
    rngs = nnx.Rngs(3)
    up, gate, down = (
        nnx.Linear(8, 16, rngs=rngs),
        nnx.Linear(8, 16, rngs=rngs),
        nnx.Linear(16, 8, rngs=rngs),
    )
    for ours, theirs in ((layer.up, up), (layer.gate, gate), (layer.down, down)):
        np.testing.assert_array_equal(np.asarray(ours.kernel[...]), np.asarray(theirs.kernel[...]))
        np.testing.assert_array_equal(np.asarray(ours.bias[...]), np.asarray(theirs.bias[...]))


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (2, 2, 2), (1, 4, 2)], ids=str)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_mlp_collectives_are_declared(mesh_shape, sp):
    mesh = utils.mesh(*mesh_shape)
    layer = shardlax.nn.ParallelMLP(16, 32, activation="swiglu", mesh=mesh, rngs=nnx.Rngs(0),
                                    sequence_parallel=sp)  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (8, 8, 16))
    step = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1)))
    report = audit.collectives(step, layer, x, mesh=mesh)
    comparison = audit.compare(layer.declared_collectives(x.shape, grad=True), report)
    assert comparison.ok, comparison.table()


def test_mlp_errors():
    mesh = utils.mesh(1, 1, 8)
    with pytest.raises(ValueError, match=r"ParallelMLP\(activation='tanh'\): expected one of"):
        shardlax.nn.ParallelMLP(8, 16, activation="tanh", mesh=mesh, rngs=nnx.Rngs(0))
    msg = r"ColumnParallelLinear\(out_features=12\) cannot be sharded over mesh axis 'model'"
    with pytest.raises(ValueError, match=msg + r" \(size 8\): 8 does not divide 12"):
        shardlax.nn.ParallelMLP(8, 12, mesh=mesh, rngs=nnx.Rngs(0))
    layer = shardlax.nn.ParallelMLP(8, 16, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    msg = (
        r"ParallelMLP\(sequence_parallel=True\): inputs.shape\[1\]=4 \(the sequence\) cannot be "
        r"sharded over mesh axis 'model' \(size 8\): 8 does not divide 4"
    )
    with pytest.raises(ValueError, match=msg):
        layer(jnp.zeros((2, 4, 8)))


def test_bfloat16_compute():
    """dtype=bfloat16: activations and matmuls in bf16, parameters and gradients stay f32."""
    mesh = utils.mesh(2, 1, 4)
    bf16 = jnp.bfloat16
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    mlp = shardlax.nn.ParallelMLP(16, 32, activation="swiglu", dtype=bf16, mesh=mesh,
                                  rngs=nnx.Rngs(0), sequence_parallel=True)  # fmt: skip
    norm = shardlax.nn.RMSNorm(16, dtype=bf16, mesh=mesh, rngs=nnx.Rngs(1))
    y = nnx.jit(lambda m, n, x: m(n(x)))(mlp, norm, x)
    assert y.dtype == bf16
    w1, b1, w2, b2, wg, bg = _params(mlp)
    h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    utils.assert_close(y, reference_mlp(h, w1, b1, w2, b2, wg, bg, "swiglu"), dtype=bf16)
    g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x).astype(jnp.float32))))(mlp, x)
    assert g["up"]["kernel"][...].dtype == jnp.float32
