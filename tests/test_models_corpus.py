"""tests/models: every corpus model runs forward, backward and trains on one device.

These check the fixtures other tests compare sharded training against: the
loss is the mean over the batch, every parameter gets a gradient, the
one-device reference mutates the state the model says it mutates, and the
hand-written pieces of the decoder (grouped-query attention, RoPE, the two
projection styles) agree with naive numpy / each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import utils
from tests.models import CORPUS, batches, decoder, host, one_device_reference, rngs_at_call

pytestmark = pytest.mark.standard_dtype_promotion

NAMES = sorted(CORPUS)
#: models whose loss couples examples or draws randomness in their default mode,
#: and the constructor arguments that make the loss a plain per-example mean.
PER_EXAMPLE_KWARGS = {"cnn": {"dropout_rate": 0.0}, "rngs_at_call": {"dropout_rate": 0.0}}


def _per_example_model(name):
    ctor, _, _ = CORPUS[name]
    model = ctor(**PER_EXAMPLE_KWARGS.get(name, {}))
    if name == "cnn":
        model.eval()  # BatchNorm on running averages: no coupling over the batch
    return model


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_mean_over_the_batch(name):
    """loss_fn(batch) == mean of loss_fn(one example): the Trainer's contract.
    One compile (forward only)."""
    _, make_batch, loss_fn = CORPUS[name]
    model = _per_example_model(name)
    batch = make_batch(jax.random.key(3), 3)

    @nnx.jit
    def run(model, batch):
        one = [loss_fn(model, jax.tree.map(lambda x, i=i: x[i : i + 1], batch)) for i in range(3)]
        return loss_fn(model, batch), jnp.stack(one)

    whole, one = run(model, batch)
    assert whole.shape == () and np.isfinite(float(whole))
    utils.assert_close(whole, np.mean(np.asarray(one)), jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_one_device_reference(name):
    """3 clipped AdamW steps: finite losses, every parameter has a nonzero first
    gradient (no dead parameter a sharded run could break unseen) and moved, the
    non-parameter state advanced as the model says. One compile."""
    ctor, make_batch, loss_fn = CORPUS[name]
    tx = utils.adamw_clipped(0.1)
    data = batches(make_batch, 8, 3)
    ref = one_device_reference(ctor, loss_fn, tx, data)
    assert len(ref.losses) == 3 and np.all(np.isfinite(ref.losses))
    assert min(ref.grad_norms) > 0.1, f"{name}: clipping not active, norms {ref.grad_norms}"
    for path, g in jax.tree_util.tree_leaves_with_path(ref.first_grads):
        where = f"{name}: gradient at {jax.tree_util.keystr(path)}"
        assert np.all(np.isfinite(g)), f"{where} is not finite"
        assert np.any(g != 0), f"{where} is zero"
    init = host(nnx.state(ctor(), nnx.Param))
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), ref.params, init)
    assert all(jax.tree.leaves(moved)), f"{name}: some parameter never moved: {moved}"
    rest = host(ref.rest)
    if name == "counter":
        assert int(rest["calls"][...]) == 3
        assert np.all(rest["hidden_mean"][...] != 0)
    if name == "cnn":
        assert np.all(rest["bn1"]["mean"][...] != 0) and np.all(rest["bn2"]["var"][...] != 1)
        assert int(rest["dropout"]["rngs"]["count"][...]) == 3
    if name == "rngs_at_call":
        assert int(rest["rngs"]["dropout"]["count"][...]) == 3


def test_dropout_masks_advance_per_call():
    """The rngs passed at call draw a new mask every call (the stream advances)."""
    model = rngs_at_call.make()
    x = jnp.ones((4, rngs_at_call.IN))
    a, b = model(x, rngs=model.rngs), model(x, rngs=model.rngs)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="rngs"):
        model(x)  # a Dropout without rngs of its own needs them at call


def test_cnn_batchnorm_normalises_over_the_batch():
    """In training mode bn1 output has batch mean ~0 per channel; eval uses running stats."""
    model = CORPUS["cnn"][0](dropout_rate=0.0)
    x = CORPUS["cnn"][1](jax.random.key(0), 8)["image"]
    y = nnx.jit(lambda m, x: m.bn1(m.conv1(x)))(model, x)
    np.testing.assert_allclose(np.mean(np.asarray(y), axis=(0, 1, 2)), 0.0, atol=1e-5)
    model.eval()
    assert model.bn1.use_running_average and model.dropout.deterministic


def _naive_gqa(q, k, v):
    """numpy: repeat each kv head over its group, causal softmax attention."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    out = np.zeros_like(q)
    for i in range(b):
        for head in range(n):
            s = q[i, :, head] @ k[i, :, head].T / np.sqrt(h)
            s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, :, head] = (p / p.sum(-1, keepdims=True)) @ v[i, :, head]
    return out


def test_gqa_matches_naive_repeated_heads():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 5, 4, 4))
    k = jax.random.normal(kk, (2, 5, 2, 4))
    v = jax.random.normal(kv, (2, 5, 2, 4))
    utils.assert_close(decoder.gqa(q, k, v), _naive_gqa(q, k, v), jnp.float32)


def test_rope_is_a_rotation_by_relative_position():
    """|rope(x)| == |x| per position, and <rope(q)_t, rope(k)_s> depends on t - s only."""
    kq, kk = jax.random.split(jax.random.key(1))
    q1 = jax.random.normal(kq, (1, 1, 1, 8))
    k1 = jax.random.normal(kk, (1, 1, 1, 8))
    q = jnp.broadcast_to(q1, (1, 6, 1, 8))
    k = jnp.broadcast_to(k1, (1, 6, 1, 8))
    rq, rk = np.asarray(decoder.rope(q))[0, :, 0], np.asarray(decoder.rope(k))[0, :, 0]
    utils.assert_close(np.linalg.norm(rq, axis=-1), np.linalg.norm(np.asarray(q)[0, :, 0], axis=-1))
    dots = rq @ rk.T
    for d in range(1, 4):
        utils.assert_close(np.diagonal(dots, d), np.full(6 - d, dots[0, d]), jnp.float32)
    assert not np.allclose(np.diagonal(dots, 1)[0], np.diagonal(dots, 2)[0])


def test_decoder_is_causal():
    model = decoder.make()
    tokens = decoder.make_batch(jax.random.key(0), 2)["inputs"]
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % decoder.VOCAB)
    forward = nnx.jit(lambda m, t: m(t))
    a, b = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_decoder_einsum_and_linear_styles_agree():
    """The fused-Linear decoder loaded with the Einsum decoder's weights gives its logits."""
    ein = decoder.make()
    lin = decoder.make_linear(activation=nnx.gelu)
    lin.embedder.embedding[...] = ein.embedder.embedding[...]
    lin.final_norm.scale[...] = ein.final_norm.scale[...]
    for le, ll in zip(ein.layers, lin.layers, strict=True):
        ll.pre_attention_norm.scale[...] = le.pre_attention_norm.scale[...]
        ll.pre_ffw_norm.scale[...] = le.pre_ffw_norm.scale[...]
        q = le.attn.q_einsum.kernel[...]  # [D, N, H]
        kv = le.attn.kv_einsum.kernel[...]  # [2, D, K, H]
        o = le.attn.attn_vec_einsum.kernel[...]  # [N, H, D]
        d = q.shape[0]
        ll.attn.q_proj.kernel[...] = q.reshape(d, -1)
        ll.attn.kv_proj.kernel[...] = jnp.concatenate(
            [kv[0].reshape(d, -1), kv[1].reshape(d, -1)], axis=-1
        )
        ll.attn.o_proj.kernel[...] = o.reshape(-1, d)
        gu = le.mlp.gating_einsum.kernel[...]  # [2, D, F]
        ll.mlp.gate_up_proj.kernel[...] = jnp.concatenate([gu[0], gu[1]], axis=-1)
        ll.mlp.down_proj.kernel[...] = le.mlp.linear.kernel[...]
    tokens = decoder.make_batch(jax.random.key(0), 2)["inputs"]
    forward = nnx.jit(lambda m, t: m(t))
    utils.assert_close(forward(lin, tokens), forward(ein, tokens), jnp.float32)
