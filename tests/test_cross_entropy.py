"""vocab_parallel_cross_entropy equals the full-softmax cross-entropy, never gathering logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import shardlax
from shardlax import audit
from tests import utils

MESHES = utils.LAYER_MESHES


def reference(logits, labels):
    """Per-token `logsumexp(z) - z[label]` in numpy (float64), on the full logits."""
    z = np.asarray(logits, np.float64)
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    return lse - np.take_along_axis(z, np.asarray(labels)[..., None], -1)[..., 0]


def reference_grad(logits, labels, count):
    """d mean(loss) / d logits = (softmax - onehot) / count."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[np.arange(z.shape[0])[:, None], np.arange(z.shape[1])[None, :], np.asarray(labels)] -= 1
    return p / count


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@utils.examples(2)  # each example compiles several sharded programs
@given(data=st.data())
def test_cross_entropy_matches_reference(mesh_shape, data):
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    batch, seq = d * f * data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4))
    v_pad = m * data.draw(st.integers(1, 4)) * 2
    vocab = data.draw(st.integers(max(1, v_pad - 2 * m + 1), v_pad), label="vocab_size")
    scale = data.draw(st.sampled_from([1.0, 30.0]))  # large logits: the max shift matters
    k = jax.random.split(jax.random.key(data.draw(st.integers(0, 2**16))), 2)
    logits = scale * jax.random.normal(k[0], (batch, seq, v_pad))
    labels = jax.random.randint(k[1], (batch, seq), 0, vocab)
    ce = shardlax.nn.vocab_parallel_cross_entropy

    per_token = jax.jit(lambda z, y: ce(z, y, vocab_size=vocab, reduction="none", mesh=mesh))(
        logits, labels
    )
    ref = reference(np.asarray(logits)[..., :vocab], labels)
    utils.assert_close(per_token, ref)
    mean, grad = jax.jit(jax.value_and_grad(lambda z: ce(z, labels, vocab_size=vocab, mesh=mesh)))(
        logits
    )
    utils.assert_close(mean, ref.mean())
    g = np.asarray(grad)
    utils.assert_close(
        g[..., :vocab], reference_grad(np.asarray(logits)[..., :vocab], labels, ref.size)
    )
    np.testing.assert_array_equal(g[..., vocab:], 0.0)  # padded columns: exactly no gradient


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 1, 8), (2, 2, 2)], ids=str)
def test_logits_never_gathered(mesh_shape):
    """Forward: 3 all-reduces of [B/n, S] over 'model' + 1 scalar over the batch; backward: none."""
    mesh = utils.mesh(*mesh_shape)
    d, f, _ = mesh_shape
    b, s, v = 8, 4, 64
    logits = utils.place(
        jnp.zeros((b, s, v)), mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "model")
    )
    labels = jnp.zeros((b, s), jnp.int32)
    fn = jax.value_and_grad(
        lambda z: shardlax.nn.vocab_parallel_cross_entropy(z, labels, mesh=mesh)
    )
    report = audit.collectives(fn, logits, mesh=mesh)
    on_model = report.where(axes=("model",))
    assert on_model.counts() == {("all-reduce", ("model",), "f32"): 3}
    assert on_model.total_bytes() == 3 * (b // (d * f)) * s * 4, on_model.table()  # [B/n, S] f32
    batch = tuple(sorted(a for a, n in (("data", d), ("fsdp", f)) if n > 1))
    assert report.where(axes=batch).counts() == {("all-reduce", batch, "f32"): 1}
    assert report.kinds()["all-gather"] == 0 and len(report) == len(on_model) + 1


def test_bad_labels_give_nan():
    """A label outside [0, vocab_size) (or in the padding) makes its token's loss NaN."""
    mesh = utils.mesh(1, 1, 4)
    logits = jax.random.normal(jax.random.key(0), (2, 3, 8))
    labels = jnp.array([[0, 5, -1], [6, 7, 2]])  # vocab_size=6: 6 and 7 are padding
    ce = shardlax.nn.vocab_parallel_cross_entropy
    loss = np.asarray(
        jax.jit(lambda z: ce(z, labels, vocab_size=6, reduction="none", mesh=mesh))(logits)
    )
    bad = np.array([[False, False, True], [True, True, False]])
    assert np.isnan(loss[bad]).all() and np.isfinite(loss[~bad]).all()
    assert np.isnan(float(jax.jit(lambda z: ce(z, labels, vocab_size=6, mesh=mesh))(logits)))


def test_cross_entropy_errors():
    mesh = utils.mesh(1, 1, 8)
    ce = shardlax.nn.vocab_parallel_cross_entropy
    z = jnp.zeros((2, 3, 16))
    with pytest.raises(
        TypeError,
        match=r"vocab_parallel_cross_entropy: labels must be integer class ids, got float32",
    ):
        ce(z, jnp.zeros((2, 3)), mesh=mesh)
    with pytest.raises(ValueError, match=r"labels.shape=\(2, 4\) must equal logits.shape\[:-1\]"):
        ce(z, jnp.zeros((2, 4), jnp.int32), mesh=mesh)
    msg = (
        r"logits.shape\[-1\]=12 \(the vocabulary\) cannot be split over mesh axis 'model' "
        r"\(size 8\): 8 does not divide 12. Pad the vocabulary to a multiple of 8 \(e.g. 16\) "
        r"and pass vocab_size=12"
    )
    with pytest.raises(ValueError, match=msg):
        ce(jnp.zeros((2, 3, 12)), jnp.zeros((2, 3), jnp.int32), mesh=mesh)
    with pytest.raises(
        ValueError, match=r"vocab_size=17\): must be in \[1, logits.shape\[-1\]=16\]"
    ):
        ce(z, jnp.zeros((2, 3), jnp.int32), vocab_size=17, mesh=mesh)


class _TiedLM(nnx.Module):
    """A tied-embedding LM whose logits stay split over the vocabulary."""

    def __init__(self, mesh, rngs):
        self.emb = shardlax.nn.ParallelEmbed(32, 16, mesh=mesh, rngs=rngs)

    def __call__(self, ids):
        return self.emb.attend(jnp.tanh(self.emb(ids)))


@pytest.mark.standard_dtype_promotion  # optax's Adam mixes Python floats and int32 counts
@pytest.mark.parametrize(("shape", "strategy"), [((2, 1, 4), "zero2"), ((4, 1, 2), "dp")])
def test_inside_the_trainer_step_equals_one_device(shape, strategy):
    """The loss of a Trainer step (manual mode): 3 Adam steps as plain nnx + optax, audited."""
    mesh = utils.mesh(*shape)

    def loss_fn(model, batch):
        logits = model(batch["x"])
        return shardlax.nn.vocab_parallel_cross_entropy(logits, batch["y"], mesh=mesh)

    batches = [
        {"x": jax.random.randint(jax.random.key(s), (8, 6), 0, 32),
         "y": jax.random.randint(jax.random.key(s + 10), (8, 6), 0, 32)}
        for s in range(3)
    ]  # fmt: skip
    ref = nnx.Embed(32, 16, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def ref_step(ref, opt, batch):
        def loss(ref):
            logits = ref.attend(jnp.tanh(ref(batch["x"])))
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        value, grads = nnx.value_and_grad(loss)(ref)
        opt.update(ref, grads)
        return value

    trainer = shardlax.Trainer(
        _TiedLM(mesh, nnx.Rngs(0)), optax.adam(1e-2), loss_fn, mesh=mesh, strategy=strategy
    )
    state = trainer.init()
    for batch in batches:
        want = ref_step(ref, opt, batch)
        state, metrics = trainer.step(state, batch)
        utils.assert_close(metrics["loss"], want)
    utils.assert_close(trainer.model(state).emb.embedding[...], ref.embedding[...])
    report = audit.collectives(trainer.step, state, batches[0])
    # the loss's 3 [B, S] all-reduces over model and its mean over the batch axes, in the model
    local = (8 // shape[0], 6)
    ce = [audit.Declared("all-reduce", ("model",), "f32", 3, 3 * 4 * local[0] * local[1], "ce"),
          audit.Declared("all-reduce", ("data",), "f32", 1, 4, "ce mean")]  # fmt: skip
    emb = trainer.model(state).emb
    model_side = emb.declared_collectives((8, 6), grad=True, attend=True)
    declared = trainer.declared_collectives(
        batches[0], model_collectives=[*model_side, *ce], loss_in_model=True
    )
    cmp = audit.compare(declared, report)
    assert cmp.ok, cmp.table()
