"""Sequence parallelism on Column/RowParallelLinear: math, layouts, collectives, errors.

References are plain jnp on the full (numpy) arrays; they never call shardlax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.precision import MixedPrecision
from tests import utils

#: (data, fsdp, model) meshes: model only, data x model, fsdp x model.
SP_MESHES = [(1, 1, 2), (2, 1, 4), (1, 2, 2)]
B, S, D, F = 4, 8, 16, 32  # global batch, sequence, model width, hidden width

Col, Row = shardlax.nn.ColumnParallelLinear, shardlax.nn.RowParallelLinear


def _check_linear(layer, x, cot, dtype=jnp.float32):
    """Forward and gradients (input, kernel, bias) vs `utils.reference_linear`, ratio 1."""
    w = np.asarray(layer.kernel[...])
    b = np.asarray(layer.bias[...]) if layer.use_bias else None
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    utils.assert_close(y, utils.reference_linear(x, w, b, dtype), dtype, "forward")
    utils.assert_sharding(y, layer.mesh, layer.output_spec(x.ndim))

    loss = lambda m, x: jnp.sum(m(x).astype(jnp.float32) * cot)
    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    ref_loss = lambda x, w, b: jnp.sum(
        utils.reference_linear(x, w, b, dtype).astype(jnp.float32) * cot
    )
    argnums = (0, 1, 2) if b is not None else (0, 1)
    ref = jax.grad(ref_loss, argnums=argnums)(np.asarray(x), w, b)
    utils.assert_close(dx, ref[0], dtype, "d input")
    utils.assert_sharding(dx, layer.mesh, layer.input_spec(x.ndim))
    utils.assert_close(grads["kernel"][...], ref[1], dtype, "d kernel")
    if b is not None:
        utils.assert_close(grads["bias"][...], ref[2], dtype, "d bias")


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mesh_shape", SP_MESHES, ids=str)
def test_column_sp_matches_reference(mesh_shape, use_bias):
    mesh = utils.mesh(*mesh_shape)
    col = utils.with_random_bias(Col(D, F, mesh=mesh, use_bias=use_bias, rngs=nnx.Rngs(0),
                                     sequence_parallel=True), 1)  # fmt: skip
    batch = col._batch_entry()
    assert col.input_spec(3) == P(batch, col._spec_axis("model"), None)  # [B, S/N, D]
    assert col.output_spec(3) == P(batch, None, col._spec_axis("model"))  # [B, S, F/N]
    x = jax.random.normal(jax.random.key(2), (B, S, D))
    _check_linear(col, x, np.asarray(jax.random.normal(jax.random.key(3), (B, S, F))))


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mesh_shape", SP_MESHES, ids=str)
def test_row_sp_matches_reference(mesh_shape, use_bias):
    mesh = utils.mesh(*mesh_shape)
    row = utils.with_random_bias(Row(F, D, mesh=mesh, use_bias=use_bias, rngs=nnx.Rngs(0),
                                     sequence_parallel=True), 1)  # fmt: skip
    batch = row._batch_entry()
    assert row.input_spec(3) == P(batch, None, row._spec_axis("model"))  # [B, S, F/N]
    assert row.output_spec(3) == P(batch, row._spec_axis("model"), None)  # [B, S/N, D]
    x = jax.random.normal(jax.random.key(2), (B, S, F))
    _check_linear(row, x, np.asarray(jax.random.normal(jax.random.key(3), (B, S, D))))


def test_row_sp_bias_added_once_gradient_exact():
    """Bias added after the reduce-scatter, once per token; its gradient sums all B*S tokens."""
    mesh = utils.mesh(2, 1, 4)
    row = Row(F, D, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True, use_bias=True)
    row.bias[...] = jax.device_put(jnp.full((D,), 3.0), row.bias[...].sharding)
    row.kernel[...] = jax.device_put(jnp.zeros((F, D)), row.kernel[...].sharding)
    x = jnp.ones((B, S, F))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m: m(x))(row)), 3.0)
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x))))(row)
    np.testing.assert_array_equal(np.asarray(g["bias"][...]), np.full((D,), B * S, np.float32))


@given(data=st.data())
@utils.examples(4)  # one mesh; 4 draws cover column/row x dtype x bias
def test_sp_linear_drawn_shapes(data):
    """Drawn shapes (rank 3 or 4, divisible by construction), dtypes, bias, layer kind."""
    mesh = utils.mesh(2, 1, 4)
    column = data.draw(st.booleans(), "column")
    seq = data.draw(st.integers(1, 2), "seq") * 4
    extra = data.draw(st.sampled_from([(), (3,)]), "extra dims")
    in_f = data.draw(st.integers(1, 3)) * (1 if column else 4)
    out_f = data.draw(st.integers(1, 3)) * (4 if column else 1)
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]), "dtype")
    use_bias = data.draw(st.booleans(), "use_bias")
    layer = (Col if column else Row)(
        in_f, out_f, mesh=mesh, dtype=dtype, use_bias=use_bias, rngs=nnx.Rngs(0),
        sequence_parallel=True,
    )  # fmt: skip
    utils.with_random_bias(layer, 4)
    lead = (2, seq, *extra)
    x = jax.random.normal(jax.random.key(5), (*lead, in_f))
    cot = np.asarray(jax.random.normal(jax.random.key(6), (*lead, out_f)))
    _check_linear(layer, x, cot, dtype)


def _chain(mesh, sp, *, use_bias=True, **kw):
    col = utils.with_random_bias(Col(D, F, mesh=mesh, use_bias=use_bias, rngs=nnx.Rngs(0),
                                     sequence_parallel=sp, **kw), 2)  # fmt: skip
    row = utils.with_random_bias(Row(F, D, mesh=mesh, use_bias=use_bias, rngs=nnx.Rngs(1),
                                     sequence_parallel=sp, **kw), 3)  # fmt: skip
    return col, row


def _chain_loss(col, row, x, cot):
    return jnp.sum(row(jax.nn.gelu(col(x))).astype(jnp.float32) * cot)


def _chain_audit(col, row, x, cot, *, dtype=None):
    """Compiled collectives of one training step (all gradients) and the comparison.

    The loss is quadratic in the output, so the backward needs the forward's output
    (a linear loss lets XLA drop the forward's last collective as dead code), and
    `grad` alone, so no scalar loss is reduced across devices.
    """
    loss = lambda c, r, x, cot: jnp.sum(jnp.square(r(jax.nn.gelu(c(x))).astype(jnp.float32)) * cot)
    report = audit.collectives(nnx.jit(nnx.grad(loss, argnums=(0, 1, 2))), col, row, x, cot)
    declared = col.declared_collectives(x.shape, grad=True, dtype=dtype)
    declared += row.declared_collectives((*x.shape[:-1], F), grad=True, dtype=dtype)
    return report, audit.compare(declared, report)


@pytest.mark.parametrize(
    "reshard, policy",
    [(True, None), (False, None), (True, "bf16"), (False, "bf16")],
    ids=["reshard", "keep", "reshard-bf16", "keep-bf16"],
)
def test_sp_chain_composes_with_fsdp(reshard, policy):
    """col -> gelu -> row with SP on a fsdp x model mesh: FSDP gathers, resharding, policy."""
    mesh = utils.mesh(1, 2, 2)
    mp = (
        None
        if policy is None
        else MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)
    )
    col, row = _chain(mesh, True, reshard_after_forward=reshard, mixed_precision=mp)
    assert col.fsdp_axis == "fsdp" and row.kernel_spec == P("model", "fsdp")
    dtype = jnp.float32 if mp is None else jnp.bfloat16
    x = jax.random.normal(jax.random.key(4), (B, S, D))
    cot = np.asarray(jax.random.normal(jax.random.key(5), (B, S, D)))
    params = [np.asarray(p[...]) for p in (col.kernel, col.bias, row.kernel, row.bias)]

    def ref_loss(w1, b1, w2, b2, x):
        y = utils.reference_linear(
            jax.nn.gelu(utils.reference_linear(x, w1, b1, dtype)), w2, b2, dtype
        )
        return jnp.sum(y.astype(jnp.float32) * cot), y

    (_, ref_y), ref = jax.value_and_grad(ref_loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        *params, np.asarray(x)
    )
    y = nnx.jit(lambda c, r, x: r(jax.nn.gelu(c(x))))(col, row, x)
    assert y.dtype == dtype
    utils.assert_close(y, ref_y, dtype, "forward")
    utils.assert_sharding(y, mesh, row.output_spec(3))
    gc, gr, gx = nnx.jit(nnx.grad(_chain_loss, argnums=(0, 1, 2)))(col, row, x, cot)
    got = (gc["kernel"][...], gc["bias"][...], gr["kernel"][...], gr["bias"][...], gx)
    for name, g, r in zip(("dW1", "db1", "dW2", "db2", "dx"), got, ref, strict=True):
        assert g.dtype == jnp.float32, name
        utils.assert_close(g, r, dtype, name)  # ratio 1, never the mesh size
    utils.assert_sharding(gr["kernel"][...], mesh, row.kernel_spec)  # reduce-scattered

    # XLA:CPU widens a bf16 all-gather / reduce-scatter of activations to f32 (the
    # parameters' FSDP gathers travel as u16 bits, unaffected): declare the activations in f32
    report, comparison = _chain_audit(col, row, x, cot, dtype=jnp.float32)
    assert comparison.ok, comparison.table() + "\n" + report.table()
    if mp is not None:
        assert {c.dtype for c in report.where("all-gather", ("fsdp",))} == {"u16"}


@pytest.mark.parametrize("mesh_shape", SP_MESHES, ids=str)
def test_sp_chain_collectives_replace_all_reduce(mesh_shape):
    """TP: 2 all-reduces of activations over model (y, dx). SP: 2 all-gathers (x, dy) and
    2 reduce-scatters (y, dx) instead, the same wire bytes; the row bias gradient's
    all-reduce spans the model axis too. Compiled == declared, in both cases."""
    mesh = utils.mesh(*mesh_shape)
    x = jax.random.normal(jax.random.key(4), (B, S, D))
    cot = np.asarray(jax.random.normal(jax.random.key(5), (B, S, D)))
    local_act = B // (mesh_shape[0] * mesh_shape[1]) * S * D * 4  # [B/batch, S, D] f32
    measured = {}
    for sp in (False, True):
        col, row = _chain(mesh, sp)
        report, comparison = _chain_audit(col, row, x, cot)
        assert comparison.ok, comparison.table() + "\n" + report.table()
        acts = report.where(axes=("model",))
        acts = type(report)(c for c in acts if c.bytes >= local_act)
        measured[sp] = acts
    tp, sp = measured[False], measured[True]
    assert tp.counts() == {("all-reduce", ("model",), "f32"): 2}, tp.table()
    assert sp.counts() == {
        ("all-gather", ("model",), "f32"): 2,
        ("reduce-scatter", ("model",), "f32"): 2,
    }, sp.table()
    assert all(c.bytes == local_act for c in (*tp, *sp))  # [B/batch, S, D], S whole
    assert sp.executed_wire_bytes() == tp.executed_wire_bytes() > 0


def test_sp_declared_collectives():
    """The declared activation collectives: SP's gather / scatter pairs replace the all-reduces."""
    mesh = utils.mesh(2, 1, 4)
    act = (B // 2) * S * D * 4
    hid = (B // 2) * S * F * 4
    kinds = lambda ds: sorted((d.kind, d.axes, d.bytes) for d in ds if d.axes == ("model",))
    col, row = _chain(mesh, True, use_bias=False)
    assert kinds(col.declared_collectives((B, S, D))) == [("all-gather", ("model",), act)]
    assert kinds(col.declared_collectives((B, S, D), grad=True)) == [
        ("all-gather", ("model",), act), ("reduce-scatter", ("model",), act)]  # fmt: skip
    assert kinds(col.declared_collectives((B, S, D), grad=True, input_grad=False)) == [
        ("all-gather", ("model",), act)]  # fmt: skip
    assert kinds(row.declared_collectives((B, S, F))) == [("reduce-scatter", ("model",), act)]
    assert kinds(row.declared_collectives((B, S, F), grad=True)) == [
        ("all-gather", ("model",), act), ("reduce-scatter", ("model",), act)]  # fmt: skip
    tcol, trow = _chain(mesh, False, use_bias=False)
    assert kinds(tcol.declared_collectives((B, S, D), grad=True)) == [
        ("all-reduce", ("model",), act)]  # fmt: skip
    assert kinds(trow.declared_collectives((B, S, F))) == [("all-reduce", ("model",), act)]
    assert hid > act  # the hidden [B, S, F/N] never moves over model


def test_sp_errors():
    mesh = utils.mesh(1, 1, 4)
    col = Col(D, F, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    row = Row(F, D, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    for layer, feat in ((col, D), (row, F)):
        name = type(layer).__name__
        msg = (
            rf"{name}\(sequence_parallel=True\): inputs.shape\[1\]=6 \(the sequence\) cannot "
            rf"be sharded over mesh axis 'model' \(size 4\): 4 does not divide 6. Use a "
            rf"sequence length divisible by 4, or sequence_parallel=False"
        )
        with pytest.raises(ValueError, match=msg):
            layer(jnp.zeros((2, 6, feat)))
        with pytest.raises(ValueError, match=rf"{name}\(sequence_parallel=True\): inputs.shape="
                           rf"\(2, {feat}\) has rank 2; sequence parallelism needs \[batch, "
                           rf"sequence, ..., features\] \(rank >= 3\)"):  # fmt: skip
            layer(jnp.zeros((2, feat)))
    with pytest.raises(ValueError, match=r"ColumnParallelLinear\(sequence_parallel=True, "
                       r"gather_output=True\): .*Pass sequence_parallel=False, or drop "
                       r"gather_output"):  # fmt: skip
        Col(D, F, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True, gather_output=True)
    with pytest.raises(ValueError, match=r"RowParallelLinear\(sequence_parallel=True, "
                       r"input_is_parallel=False\): .*mesh axis 'model' \(size 4\)"):  # fmt: skip
        Row(F, D, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True, input_is_parallel=False)
