"""ParallelEmbed is a drop-in for nnx.Embed: constructor, ids of any shape, out-of-vocabulary ids.

The reference is flax's own `nnx.Embed` on one device (and, for the table
gradient, `jax.grad` through it): values bit for bit (NaN where flax gives
NaN), gradients within the f32 tolerance.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from shardlax import audit
from shardlax.models import TinyLM, TinyLMConfig
from tests import utils

#: (data, fsdp, model): one device, the model axis, and model + FSDP + data together.
MESHES = [(1, 1, 1), (1, 1, 2), (2, 2, 2)]


def _pair(mesh, vocab, features=4, seed=0, **kw):
    """A ParallelEmbed and an nnx.Embed with the same table."""
    layer = shardlax.nn.ParallelEmbed(vocab, features, mesh=mesh, rngs=nnx.Rngs(seed), **kw)
    ref = nnx.Embed(vocab, features, rngs=nnx.Rngs(seed))
    np.testing.assert_array_equal(np.asarray(layer.embedding[...]), np.asarray(ref.embedding[...]))
    return layer, ref


def _masked_loss(cot):
    """sum(y * cot) over the finite entries of y (an OOV id's NaN row counts nothing)."""

    def loss(m, ids):
        y = m(ids)
        return jnp.sum(jnp.where(jnp.isnan(y), jnp.zeros((), y.dtype), y) * cot)

    return loss


def test_constructor_and_call_signatures_match_flax():
    """Every nnx.Embed argument exists with the same kind and default; calls take out_sharding."""
    ours = inspect.signature(shardlax.nn.ParallelEmbed.__init__).parameters
    for name, p in inspect.signature(nnx.Embed.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        if name not in ("embedding_metadata",):
            assert ours[name].default is p.default or ours[name].default == p.default, name
    for method in ("__call__", "attend"):
        flax_params = list(inspect.signature(getattr(nnx.Embed, method)).parameters)
        our_params = list(inspect.signature(getattr(shardlax.nn.ParallelEmbed, method)).parameters)
        assert our_params[: len(flax_params)] == flax_params, method


@pytest.mark.parametrize("mesh_shape", [(1, 1, 2), (2, 2, 2)], ids=str)
def test_ids_of_any_rank_match_nnx_embed(mesh_shape):
    """Scalar, [B], [B, S], [B, S, K] ids and [D] .. [B, S, K, D] queries: values and gradients."""
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    b, vocab, feats = d * f * 2, 8 * m, 4
    layer, ref = _pair(mesh, vocab, feats)
    k = jax.random.split(jax.random.key(1), 4)
    ids3 = jax.random.randint(k[0], (b, 3, 2), -vocab, vocab)
    q4 = jax.random.normal(k[2], (b, 3, 2, feats))
    unbatched = d * f == 1  # a scalar id / one query vector: only when the batch is not split
    # [B, S] ids and [B, S, D] queries are the other tests' case
    ids_cases = [ids3, ids3[:, 0, 0]] + ([ids3[0, 0, 0]] if unbatched else [])
    q_cases = [q4, q4[:, 0, 0]] + ([q4[0, 0, 0]] if unbatched else [])
    y_cots = [jax.random.normal(k[1], (*i.shape, feats)) for i in ids_cases]
    l_cots = [jax.random.normal(k[3], (*q.shape[:-1], vocab)) for q in q_cases]

    def run(module, ids_cases, q_cases):
        """Every lookup and head, and the gradient of one loss over all of them (one program)."""
        ys = [module(i) for i in ids_cases]
        logits = [module.attend(q) for q in q_cases]

        def loss(module, qs):
            total = sum(_masked_loss(c)(module, i) for c, i in zip(y_cots, ids_cases, strict=True))
            for c, q in zip(l_cots, qs, strict=True):
                total += jnp.sum(module.attend(q) * c)
            return total

        return ys, logits, nnx.grad(loss, argnums=(0, 1))(module, q_cases)

    ys, logits, (g, dqs) = nnx.jit(run)(layer, ids_cases, q_cases)
    ys_ref, logits_ref, (g_ref, dqs_ref) = nnx.jit(run)(ref, ids_cases, q_cases)
    for ids, y, y_ref in zip(ids_cases, ys, ys_ref, strict=True):
        assert y.shape == (*ids.shape, feats)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref), err_msg=str(ids.shape))
    for q, lg, lg_ref, dq, dq_ref in zip(q_cases, logits, logits_ref, dqs, dqs_ref, strict=True):
        utils.assert_close(lg, lg_ref, err_msg=f"attend {q.shape}")
        utils.assert_close(dq, dq_ref, err_msg=f"d query {q.shape}")
    utils.assert_close(g["embedding"][...], g_ref["embedding"][...], err_msg="d table")


@pytest.mark.parametrize("mesh_shape", [(1, 1, 2), (2, 2, 2)], ids=str)
def test_rank_1_and_3_ids_collectives_are_declared(mesh_shape):
    mesh = utils.mesh(*mesh_shape)
    layer = shardlax.nn.ParallelEmbed(16, 8, mesh=mesh, rngs=nnx.Rngs(0))
    for shape in [(8,), (4, 2, 3)]:
        ids = jnp.zeros(shape, jnp.int32)
        step = nnx.jit(nnx.grad(lambda m, i: jnp.sum(m.attend(m(i)) ** 2)))
        report = audit.collectives(step, layer, ids, mesh=mesh)
        want = layer.declared_collectives(shape, grad=True, attend=True)
        comparison = audit.compare(want, report)
        assert comparison.ok, comparison.table()


def _oov_ids(vocab, padded, dtype):
    """Every kind of id: in range, negative in range, past the vocabulary, in the padding."""
    info = jnp.iinfo(dtype)
    vals = [0, 1, vocab - 1, vocab, vocab + 1, padded - 1, padded, 3 * padded]
    if info.min < 0:
        vals += [-1, -2, -vocab, -vocab - 1, -padded, -3 * padded]
    vals.append(info.max)
    if info.min < 0:
        vals.append(info.min)
    vals = sorted({v for v in vals if info.min <= v <= info.max})
    vals += vals[: -len(vals) % 4]  # a batch of 4 (the batch axes of (2, 2, 2))
    return jnp.asarray(np.array(vals).reshape(4, -1), dtype)


OOV_CASES = [((1, 1, 2), False), ((1, 1, 2), True), ((2, 2, 2), True)]
ID_DTYPES = (jnp.int32, jnp.int8, jnp.int16, jnp.uint8, jnp.uint32)


@pytest.mark.parametrize(("mesh_shape", "padded"), OOV_CASES, ids=str)
def test_out_of_vocabulary_ids_match_nnx_embed(mesh_shape, padded):
    """ids >= V and < -V embed to NaN with zero gradient, -1 is row V-1; padding never read.

    With `padded`, the table has rows past the real vocabulary (vocab_size=)
    filled with a value nnx.Embed(V) never sees: they must never appear.
    Every integer dtype of ids (narrow ones, unsigned, uint32 past 2**31).
    """
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    vocab = 6 * m - 1 if padded else 6 * m
    rows = 6 * m
    ref = nnx.Embed(vocab, 4, rngs=nnx.Rngs(3))
    table = jnp.concatenate([ref.embedding[...], jnp.full((rows - vocab, 4), 1e6)])
    layer = shardlax.nn.ParallelEmbed(
        rows, 4, mesh=mesh, rngs=nnx.Rngs(0), vocab_size=vocab if padded else None,
        embedding_init=lambda key, shape, dtype: table.astype(dtype),
    )  # fmt: skip
    ids_cases = [_oov_ids(vocab, rows, dt) for dt in ID_DTYPES]
    cots = [jax.random.normal(jax.random.key(i), (*x.shape, 4)) for i, x in enumerate(ids_cases)]

    def run(module, ids_cases):
        def loss(module):
            return sum(_masked_loss(c)(module, i) for c, i in zip(cots, ids_cases, strict=True))

        return [module(i) for i in ids_cases], nnx.grad(loss)(module)["embedding"][...]

    ys, got = nnx.jit(run)(layer, ids_cases)
    ys_ref, g_ref = nnx.jit(run)(ref, ids_cases)
    for dt, y, want in zip(ID_DTYPES, ys, ys_ref, strict=True):
        y, want = np.asarray(y), np.asarray(want)
        np.testing.assert_array_equal(y, want, err_msg=str(dt))
        assert np.isnan(want).any() and not (y == 1e6).any()
    got = np.asarray(got)
    utils.assert_close(got[:vocab], g_ref, err_msg="d table")
    np.testing.assert_array_equal(got[vocab:], 0.0)  # padded rows: no gradient


def test_one_row_broadcasts_as_nnx_embed():
    """nnx.Embed(1, D) gives its only row for every id, in range or not."""
    layer, ref = _pair(utils.mesh(1, 1, 1), 1)
    ids = jnp.array([0, 5, -3, 1])
    np.testing.assert_array_equal(np.asarray(layer(ids)), np.asarray(ref(ids)))
    loss = _masked_loss(jnp.arange(16.0).reshape(4, 4))
    got = nnx.jit(nnx.grad(loss))(layer, ids)["embedding"][...]
    utils.assert_close(got, nnx.grad(loss)(ref, ids)["embedding"][...])


def test_tinylm_embeds_oov_ids_as_nnx_embed():
    """TinyLM pads its table to vocab_multiple; an id in the padding is NaN, -1 is row vocab-1."""
    mesh = utils.mesh(1, 1, 2)  # the padded table split over the model axis
    cfg = TinyLMConfig(vocab=13, seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16)
    assert cfg.padded_vocab > cfg.vocab
    lm = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    ref = nnx.Embed(cfg.vocab, cfg.d_model, rngs=nnx.Rngs(0))
    ref.embedding.set_value(jnp.asarray(np.asarray(lm.embed.embedding[...])[: cfg.vocab]))
    v, p = cfg.vocab, cfg.padded_vocab
    ids = jnp.array([[0, v - 1, v, p - 1, p, -1, -v, -v - 1]])
    np.testing.assert_array_equal(np.asarray(lm.embed(ids)), np.asarray(ref(ids)))


def test_metadata_and_with_partitioning_initializers():
    mesh = utils.mesh(1, 1, 2)
    meta = {"sharding_metadata": ("vocab", "embed")}
    layer = shardlax.nn.ParallelEmbed(
        8, 4, mesh=mesh, rngs=nnx.Rngs(0), embedding_metadata=meta,
        embedding_init=nnx.with_partitioning(nnx.initializers.ones, ("vocab", None)),
    )  # fmt: skip
    assert layer.embedding.sharding_metadata == ("vocab", "embed")
    np.testing.assert_array_equal(np.asarray(layer.embedding[...]), np.ones((8, 4)))
    utils.assert_sharding(layer.embedding[...], mesh, layer.embedding_spec)


def test_out_sharding_lays_out_the_result():
    mesh = utils.mesh(2, 1, 2)
    layer, ref = _pair(mesh, 8)
    ids = jnp.arange(8).reshape(2, 4)
    spec = jax.sharding.PartitionSpec(None, None, None)
    y = nnx.jit(lambda m, i: m(i, out_sharding=spec))(layer, ids)
    utils.assert_sharding(y, mesh, spec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(ids)))
    logits = layer.attend(y, out_sharding=jax.sharding.NamedSharding(mesh, spec))
    utils.assert_sharding(logits, mesh, spec)
    utils.assert_close(logits, ref.attend(y))


def test_parity_errors():
    mesh = utils.mesh(1, 1, 2)
    layer = shardlax.nn.ParallelEmbed(8, 4, mesh=mesh, rngs=nnx.Rngs(0))
    msg = r"ParallelEmbed: inputs must be integer token ids, got float32. Pass ids as int32"
    for kind in (TypeError, ValueError):  # nnx.Embed raises ValueError; shardlax TypeError
        with pytest.raises(kind, match=msg):
            layer(jnp.zeros((2, 3), jnp.float32))
    msg = (
        r"ParallelEmbed\(num_embeddings=7\) cannot be sharded over mesh axis 'model' \(size 2\): "
        r"2 does not divide 7. Pad the table to a multiple of 2 and pass the real size, e.g. "
        r"ParallelEmbed\(8, ..., vocab_size=7\)"
    )
    with pytest.raises(ValueError, match=msg):
        shardlax.nn.ParallelEmbed(7, 4, mesh=mesh, rngs=nnx.Rngs(0))
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match=rf"vocab_size={bad!r}\): vocab_size is the real"):
            shardlax.nn.ParallelEmbed(8, 4, mesh=mesh, rngs=nnx.Rngs(0), vocab_size=bad)
    split = utils.mesh(2, 1, 2)
    layer = shardlax.nn.ParallelEmbed(8, 4, mesh=split, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"inputs.shape=\(\) is one id, with no batch dim to split"
    ):
        layer(jnp.array(3))
    with pytest.raises(
        ValueError, match=r"attend: query.shape=\(4,\) is one vector, with no batch"
    ):
        layer.attend(jnp.zeros((4,)))
    sp = shardlax.nn.ParallelEmbed(8, 4, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    with pytest.raises(
        ValueError, match=r"sequence_parallel=True\): inputs.shape=\(4,\) has no seq"
    ):
        sp(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"attend: query.shape=\(2, 4\); expected \[batch, seq"):
        sp.attend(jnp.zeros((2, 4)))
