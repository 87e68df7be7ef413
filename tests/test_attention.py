"""ParallelAttention equals a plainly written attention, forward and gradients, TP and SP."""

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

MESHES = [(2, 1, 4), (2, 2, 2)]  # one device: TinyLM's test against the plain transformer


def reference_attention(x, wq, wk, wv, wo, bo, *, heads, kv_heads, theta=10000.0):
    """Causal (grouped-query) attention with RoPE, one head at a time, on full arrays."""
    b, s, _ = x.shape
    hd = wq.shape[1] // heads
    q = (x @ wq).reshape(b, s, heads, hd)
    k = (x @ wk).reshape(b, s, kv_heads, hd)
    v = (x @ wv).reshape(b, s, kv_heads, hd)

    def rope(t):
        half = hd // 2
        angle = np.arange(s)[:, None] / theta ** (2.0 * np.arange(half)[None, :] / hd)
        c = jnp.asarray(np.cos(angle)[None, :, None, :], jnp.float32)
        sn = jnp.asarray(np.sin(angle)[None, :, None, :], jnp.float32)
        a, bb = t[..., :half], t[..., half:]
        return jnp.concatenate([a * c - bb * sn, a * sn + bb * c], axis=-1)

    q, k = rope(q), rope(k)
    causal = np.tril(np.ones((s, s), bool))
    outs = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = q[:, :, h] @ jnp.swapaxes(k[:, :, g], 1, 2) / np.float32(np.sqrt(hd))  # [B,S,S]
        scores = jnp.where(causal, scores, -jnp.inf)
        outs.append(jax.nn.softmax(scores, axis=-1) @ v[:, :, g])  # [B, S, hd]
    o = jnp.stack(outs, axis=2).reshape(b, s, heads * hd)
    y = o @ wo
    return y if bo is None else y + bo[None, None, :]


def _params(layer):
    p = [
        np.asarray(lin.kernel[...])
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj)
    ]
    bo = np.asarray(layer.o_proj.bias[...]) if layer.use_bias else None
    return [jnp.asarray(a) for a in p], bo


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@utils.examples(2)  # each example compiles several sharded programs
@given(data=st.data())
def test_attention_matches_reference(mesh_shape, data):
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    sp = data.draw(st.booleans(), label="sequence_parallel")
    kv = m * data.draw(st.sampled_from([1, 2]))
    heads = kv * data.draw(st.sampled_from([1, 2]))  # grouped-query when > 1
    hd = 2 * data.draw(st.integers(1, 3))
    dim = f * 4 * data.draw(st.integers(1, 2))
    batch, seq = d * f * data.draw(st.integers(1, 2)), m * data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**16))
    layer = shardlax.nn.ParallelAttention(
        dim, heads, num_kv_heads=kv, head_dim=hd, use_bias=False, mesh=mesh,
        rngs=nnx.Rngs(seed), sequence_parallel=sp,
    )  # fmt: skip
    k = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(k[0], (batch, seq, dim))
    cot = jax.random.normal(k[1], (batch, seq, dim))
    (wq, wk, wv, wo), _ = _params(layer)

    y = nnx.jit(lambda m, x: m(x))(layer, x)
    utils.assert_sharding(y, mesh, layer.hidden_spec(3))
    ref = reference_attention(x, wq, wk, wv, wo, None, heads=heads, kv_heads=kv)
    utils.assert_close(y, ref, err_msg="forward")

    grads, dx = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1)))(layer, x)
    ref_loss = lambda x, *w: jnp.sum(
        reference_attention(x, *w, None, heads=heads, kv_heads=kv) * cot
    )
    rg = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2, 3, 4)))(x, wq, wk, wv, wo)
    utils.assert_close(dx, rg[0], err_msg="dx")
    for name, g in zip(("q_proj", "k_proj", "v_proj", "o_proj"), rg[1:], strict=True):
        utils.assert_close(grads[name]["kernel"][...], g, err_msg=f"d {name}")


def test_bias_gradient_under_sequence_parallelism():
    """The output bias is added once, after the reduce-scatter; its gradient sums all tokens."""
    mesh = utils.mesh(2, 1, 4)
    layer = shardlax.nn.ParallelAttention(16, 4, use_bias=True, mesh=mesh, rngs=nnx.Rngs(0),
                                          sequence_parallel=True)  # fmt: skip
    bo = jax.random.normal(jax.random.key(1), (16,))
    layer.o_proj.bias[...] = jax.device_put(bo, layer.o_proj.bias[...].sharding)
    x = jax.random.normal(jax.random.key(2), (2, 8, 16))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    assert float(jnp.max(jnp.abs(layer.q_proj.bias[...]))) == 0.0  # zero-init q/k/v biases
    (wq, wk, wv, wo), _ = _params(layer)
    utils.assert_close(y, reference_attention(x, wq, wk, wv, wo, bo, heads=4, kv_heads=4))
    g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x))))(layer, x)
    np.testing.assert_allclose(np.asarray(g["o_proj"]["bias"][...]), np.full(16, 16.0), rtol=0)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 1, 8), (2, 2, 2)], ids=str)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_attention_collectives_are_declared(mesh_shape, sp):
    mesh = utils.mesh(*mesh_shape)
    layer = shardlax.nn.ParallelAttention(
        16, 8, num_kv_heads=mesh_shape[2], use_bias=True, mesh=mesh, rngs=nnx.Rngs(0),
        sequence_parallel=sp,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    step = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1)))
    report = audit.collectives(step, layer, x, mesh=mesh)
    comparison = audit.compare(layer.declared_collectives(x.shape, grad=True), report)
    assert comparison.ok, comparison.table()
    # activation-sized collectives over 'model' only (the bias gradient is 16 floats)
    acts = [c for c in report.where(axes=("model",)) if c.bytes > 16 * 4]
    kinds = {c.kind: sum(a.operands for a in acts if a.kind == c.kind) for c in acts}
    if sp:  # Megatron-SP: gather in, scatter out, and the mirror image backward
        assert kinds == {"all-gather": 2, "reduce-scatter": 2}
    else:  # Megatron-TP: one all-reduce forward (y), one backward (dx)
        assert kinds == {"all-reduce": 2}


def test_attention_errors():
    mesh = utils.mesh(1, 1, 4)
    kw = dict(mesh=mesh, rngs=nnx.Rngs(0))
    attn = shardlax.nn.ParallelAttention
    msg = r"ParallelAttention\(num_heads=6\) cannot be split over mesh axis 'model' \(size 4\)"
    with pytest.raises(ValueError, match=msg + r": 4 does not divide 6. Heads are the unit"):
        attn(24, 6, **kw)
    msg = r"ParallelAttention\(num_kv_heads=2\) cannot be split over mesh axis 'model' \(size 4\)"
    with pytest.raises(ValueError, match=msg + r": 4 does not divide 2"):
        attn(32, 8, num_kv_heads=2, **kw)
    msg = r"num_heads=8, num_kv_heads=12\): grouped-query attention needs num_kv_heads to divide"
    with pytest.raises(ValueError, match=msg):
        attn(32, 8, num_kv_heads=12, **kw)
    msg = r"ParallelAttention\(head_dim=3\): rotary embeddings rotate pairs of features"
    with pytest.raises(ValueError, match=msg + ", so head_dim must be even"):
        attn(24, 8, **kw)
    layer = attn(32, 8, sequence_parallel=True, **kw)
    msg = (
        r"ParallelAttention\(sequence_parallel=True\): inputs.shape\[1\]=6 \(the sequence\) "
        r"cannot be sharded over mesh axis 'model' \(size 4\): 4 does not divide 6"
    )
    with pytest.raises(ValueError, match=msg):
        layer(jnp.zeros((2, 6, 32)))
    msg = r"ParallelAttention\(in_features=32\): inputs.shape\[-1\] is 16"
    with pytest.raises(ValueError, match=msg):
        layer(jnp.zeros((2, 8, 16)))
