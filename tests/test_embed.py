"""ParallelEmbed equals nnx.Embed (init, lookup, attend) and plain-jnp gradients on any mesh."""

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


def reference(table, ids, query, cot_y, cot_logits):
    """Plain jnp on the full table: lookup, tied head and their gradients."""

    def loss(table, query):
        y = jnp.take(table, ids, axis=0)
        logits = query @ table.T
        return jnp.sum(y * cot_y) + jnp.sum(logits * cot_logits)

    return (
        jnp.take(table, ids, axis=0),
        query @ table.T,
        jax.grad(loss, argnums=(0, 1))(table, query),
    )


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
@utils.examples(2)  # each example compiles several sharded programs
@given(data=st.data())
def test_embed_matches_reference(mesh_shape, data):
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    sp = data.draw(st.booleans(), label="sequence_parallel")
    lookup = data.draw(st.sampled_from(["auto", "table", "ids"]), label="fsdp_lookup")
    vocab = m * data.draw(st.integers(1, 3)) * 4
    feats = f * data.draw(st.integers(1, 3)) * 4
    batch, seq = d * f * data.draw(st.integers(1, 2)), m * data.draw(st.integers(1, 2))
    seed = data.draw(st.integers(0, 2**16))
    k = jax.random.split(jax.random.key(seed), 4)
    layer = shardlax.nn.ParallelEmbed(vocab, feats, mesh=mesh, rngs=nnx.Rngs(seed),
                                      sequence_parallel=sp, fsdp_lookup=lookup)  # fmt: skip
    flax_layer = nnx.Embed(vocab, feats, rngs=nnx.Rngs(seed))
    table = np.asarray(layer.embedding[...])
    np.testing.assert_array_equal(table, np.asarray(flax_layer.embedding[...]))  # same init

    ids = jax.random.randint(k[0], (batch, seq), 0, vocab)
    query = jax.random.normal(k[1], (batch, seq, feats))
    cot_y = jax.random.normal(k[2], (batch, seq, feats))
    cot_l = jax.random.normal(k[3], (batch, seq, vocab))
    y_ref, logits_ref, (d_table, d_query) = reference(jnp.asarray(table), ids, query, cot_y, cot_l)

    y = nnx.jit(lambda m, i: m(i))(layer, ids)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # exact: a lookup
    np.testing.assert_array_equal(np.asarray(y), np.asarray(flax_layer(ids)))
    utils.assert_sharding(y, mesh, layer.hidden_spec(3))
    logits = nnx.jit(lambda m, q: m.attend(q))(layer, query)
    utils.assert_close(logits, logits_ref, err_msg="attend")
    utils.assert_close(logits, flax_layer.attend(query), err_msg="attend vs nnx")
    utils.assert_sharding(logits, mesh, layer.logits_spec(3))

    def loss(m, q):
        return jnp.sum(m(ids) * cot_y) + jnp.sum(m.attend(q) * cot_l)

    grads, dq = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, query)
    utils.assert_close(grads["embedding"][...], d_table, err_msg="d table")
    utils.assert_close(dq, d_query, err_msg="d query")


@pytest.mark.parametrize(
    ("mesh_shape", "lookup"),
    [((2, 1, 4), "auto"), ((2, 2, 2), "table"), ((2, 2, 2), "ids"), ((1, 4, 2), "auto")],
    ids=str,
)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_embed_collectives_are_declared(mesh_shape, lookup, sp):
    mesh = utils.mesh(*mesh_shape)
    layer = shardlax.nn.ParallelEmbed(
        32, 16, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=sp, fsdp_lookup=lookup
    )
    ids = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    step = nnx.jit(nnx.grad(lambda m, i: jnp.sum(m.attend(m(i)) ** 2)))
    report = audit.collectives(step, layer, ids, mesh=mesh)
    comparison = audit.compare(
        layer.declared_collectives(ids.shape, grad=True, attend=True), report
    )
    assert comparison.ok, comparison.table()
    model = report.where(axes=("model",))
    assert model.kinds()["all-gather"] == (2 if sp else 0)  # SP: dy of lookup, x of attend


@pytest.mark.parametrize(("batch", "seq", "table"), [(4, 4, False), (4, 8, True), (16, 8, True)])
def test_fsdp_lookup_moves_the_smaller_of_table_and_tokens(batch, seq, table):
    """auto: the table's [V/N, D] is gathered iff a device's V/(N F) rows <= its tokens."""
    mesh = utils.mesh(1, 4, 2)  # 64 rows: 8 per device; tokens per device: batch / 4 * seq
    layer = shardlax.nn.ParallelEmbed(64, 16, mesh=mesh, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, 64)
    step = nnx.jit(nnx.value_and_grad(lambda m, i: jnp.sum(m(i) ** 2)))
    report = audit.collectives(step, layer, ids, mesh=mesh)
    loss = audit.Declared("all-reduce", ("fsdp",), "f32", 1, 4, "the loss's sum")
    cmp = audit.compare([*layer.declared_collectives(ids.shape, grad=True), loss], report)
    assert cmp.ok, cmp.table()
    fsdp = report.where(axes=("fsdp",))
    ids_gathers = [c for c in fsdp if c.kind == "all-gather" and c.dtype == "s32"]
    table_gathers = [c for c in fsdp if c.kind == "all-gather" and c.bytes == 32 * 16 * 4]
    assert (len(table_gathers), len(ids_gathers)) == ((1, 0) if table else (0, 1)), report.table()
    ref = nnx.Embed(64, 16, rngs=nnx.Rngs(0))
    want_l, want_g = jax.value_and_grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) ** 2))(
        ref.embedding[...]
    )
    got_l, got_g = step(layer, ids)
    utils.assert_close(got_l, want_l)
    utils.assert_close(got_g["embedding"][...], want_g)


def test_ids_follow_jnp_take():
    """Negative ids count from the end and out-of-range ids give NaN, as nnx.Embed."""
    mesh = utils.mesh(1, 1, 4)
    layer = shardlax.nn.ParallelEmbed(8, 4, mesh=mesh, rngs=nnx.Rngs(0))
    flax_layer = nnx.Embed(8, 4, rngs=nnx.Rngs(0))
    ids = jnp.array([[-1, 0, 7, 8, -8, -9, 100, 3]])
    got = np.asarray(nnx.jit(lambda m, i: m(i))(layer, ids))
    np.testing.assert_array_equal(got, np.asarray(flax_layer(ids)))
    assert np.isnan(got[0, [3, 5, 6]]).all() and not np.isnan(got[0, [0, 1, 2, 4, 7]]).any()


def test_embed_errors():
    with pytest.raises(ValueError, match=r"fsdp_lookup='rows'\): expected 'auto', 'table'"):
        shardlax.nn.ParallelEmbed(8, 4, mesh=utils.mesh(), rngs=nnx.Rngs(0), fsdp_lookup="rows")
    mesh = utils.mesh(1, 1, 8)
    msg = r"ParallelEmbed\(num_embeddings=60\) cannot be sharded over mesh axis 'model' \(size 8\)"
    with pytest.raises(ValueError, match=msg + r": 8 does not divide 60"):
        shardlax.nn.ParallelEmbed(60, 16, mesh=mesh, rngs=nnx.Rngs(0))
    layer = shardlax.nn.ParallelEmbed(64, 16, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    with pytest.raises(
        TypeError, match=r"ParallelEmbed: inputs must be integer token ids, got float32"
    ):
        layer(jnp.zeros((2, 8), jnp.float32))
    msg = (
        r"ParallelEmbed\(sequence_parallel=True\): inputs.shape\[1\]=6 \(the sequence\) cannot "
        r"be sharded over mesh axis 'model' \(size 8\): 8 does not divide 6"
    )
    with pytest.raises(ValueError, match=msg):
        layer(jnp.zeros((2, 6), jnp.int32))
