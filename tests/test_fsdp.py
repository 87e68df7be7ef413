"""FSDP (ZeRO-3) in the tensor-parallel linears: math, collectives, storage, errors.

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

#: (data, fsdp, model) meshes with an fsdp axis of size > 1.
FSDP_MESHES = [(1, 2, 1), (2, 2, 2), (1, 8, 1), (1, 4, 2)]
D, F, B = 16, 32, 16  # in features, hidden features, global batch


def _mlp(mesh, *, reshard=True, policy=None, use_bias=True):
    kw = dict(mesh=mesh, reshard_after_forward=reshard, mixed_precision=policy, use_bias=use_bias)
    col = shardlax.nn.ColumnParallelLinear(D, F, rngs=nnx.Rngs(0), **kw)
    row = shardlax.nn.RowParallelLinear(F, D, rngs=nnx.Rngs(1), **kw)
    if use_bias:  # non-zero biases, so a bias gradient counted N times would show
        for layer, seed in ((col, 2), (row, 3)):
            b = jax.random.normal(jax.random.key(seed), layer.bias[...].shape)
            layer.bias[...] = jax.device_put(b, layer.bias[...].sharding)
    return col, row


def _loss(col, row, x, cot):
    return jnp.sum(row(jax.nn.relu(col(x))).astype(jnp.float32) * cot)


def _reference(params, x, cot, dtype):
    """Plain jnp: loss and gradients of the MLP on the full arrays, computed in `dtype`."""

    def loss(w1, b1, w2, b2, x):
        c = lambda a: jnp.asarray(a).astype(dtype)
        h = jax.nn.relu(c(x) @ c(w1) + c(b1)[None, :])
        y = h @ c(w2) + c(b2)[None, :]
        return jnp.sum(y.astype(jnp.float32) * cot)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*params, x)


def _inputs():
    x = jax.random.normal(jax.random.key(10), (B, D))
    cot = np.asarray(jax.random.normal(jax.random.key(11), (B, D)))
    return x, cot


@pytest.mark.parametrize("mesh_shape", FSDP_MESHES, ids=str)
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fsdp_mlp_matches_reference(mesh_shape, reshard):
    mesh = utils.mesh(*mesh_shape)
    col, row = _mlp(mesh, reshard=reshard)
    x, cot = _inputs()
    params = [np.asarray(p[...]) for p in (col.kernel, col.bias, row.kernel, row.bias)]

    y = nnx.jit(lambda c, r, x: r(jax.nn.relu(c(x))))(col, row, x)
    w1, b1, w2, b2 = params
    utils.assert_close(y, jax.nn.relu(np.asarray(x) @ w1 + b1[None]) @ w2 + b2[None])

    gc, gr, gx = nnx.jit(nnx.grad(_loss, argnums=(0, 1, 2)))(col, row, x, cot)
    ref = _reference(params, np.asarray(x), cot, jnp.float32)
    got = (gc["kernel"][...], gc["bias"][...], gr["kernel"][...], gr["bias"][...], gx)
    for name, g, r in zip(("dW1", "db1", "dW2", "db2", "dx"), got, ref, strict=True):
        utils.assert_close(g, r, jnp.float32, name)  # ratio 1, never the mesh size
    # gradients leave sharded like their parameters (reduce-scattered)
    utils.assert_sharding(gc["kernel"][...], mesh, col.kernel_spec)
    utils.assert_sharding(gr["kernel"][...], mesh, row.kernel_spec)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)], ids=str)
@given(data=st.data())
def test_fsdp_linear_shapes(mesh_shape, data):
    """Drawn shapes (divisible by construction), dtypes, bias, layer kind and resharding."""
    d, f, m = mesh_shape
    mesh = utils.mesh(d, f, m)
    column = data.draw(st.booleans(), "column")
    in_f = data.draw(st.integers(1, 3)) * f * (1 if column else m)
    out_f = data.draw(st.integers(1, 3)) * f * m
    lead = (data.draw(st.integers(1, 2)) * d * f, *data.draw(st.sampled_from([(), (3,)])))
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]), "dtype")
    use_bias = data.draw(st.booleans(), "use_bias")
    cls = shardlax.nn.ColumnParallelLinear if column else shardlax.nn.RowParallelLinear
    extra = {} if column else {"input_is_parallel": False}
    layer = cls(
        in_f, out_f, mesh=mesh, dtype=dtype, use_bias=use_bias, rngs=nnx.Rngs(0),
        reshard_after_forward=data.draw(st.booleans(), "reshard"), **extra,
    )  # fmt: skip
    if use_bias:
        b = jax.random.normal(jax.random.key(4), (out_f,))
        layer.bias[...] = jax.device_put(b, layer.bias[...].sharding)
    x = jax.random.normal(jax.random.key(5), (*lead, in_f))
    cot = np.asarray(jax.random.normal(jax.random.key(6), (*lead, out_f)))
    w = np.asarray(layer.kernel[...])
    bias = np.asarray(layer.bias[...]) if use_bias else np.zeros((out_f,), np.float32)

    def ref_loss(w, bias, x):
        y = x.astype(dtype) @ w.astype(dtype) + bias.astype(dtype)[(None,) * len(lead)]
        return jnp.sum(y.astype(jnp.float32) * cot)

    def loss(layer, x):
        return jnp.sum(layer(x).astype(jnp.float32) * cot)

    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    ref = jax.grad(ref_loss, argnums=(0, 1, 2))(w, bias, np.asarray(x))
    utils.assert_close(grads["kernel"][...], ref[0], dtype, "dW")
    utils.assert_close(dx, ref[2], dtype, "dx")
    if use_bias:
        utils.assert_close(grads["bias"][...], ref[1], dtype, "db")
    if not column:  # a row layer's output is replicated over model: check the value too
        y = nnx.jit(lambda m, x: m(x))(layer, x)
        y_ref = x.astype(dtype) @ w.astype(dtype) + bias.astype(dtype)[(None,) * len(lead)]
        utils.assert_close(y, y_ref, dtype, "forward")


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)], ids=str)
def test_fsdp_parameter_layout_and_bytes(mesh_shape):
    """Column kernel P('fsdp','model'), row kernel P('model','fsdp'); every param 1/N per device."""
    mesh = utils.mesh(*mesh_shape)
    col, row = _mlp(mesh)
    m = "model" if mesh.shape["model"] > 1 else None
    assert col.kernel_spec == P("fsdp", m)
    assert col.bias_spec == P(("model", "fsdp") if m else "fsdp")
    assert row.kernel_spec == P(m, "fsdp")
    assert row.bias_spec == P("fsdp")
    n = mesh.shape["fsdp"] * mesh.shape["model"]
    for layer in (col, row):
        for p in (layer.kernel[...], layer.bias[...]):
            total = p.size * p.dtype.itemsize
            shard_bytes = {s.data.nbytes for s in p.addressable_shards}
            # kernels split over fsdp x model; the row bias over fsdp only
            split = n if p.ndim == 2 or layer is col else mesh.shape["fsdp"]
            assert shard_bytes == {total // split}, (p.shape, p.sharding.spec)


def _audit(col, row, x, cot, *, input_grad=True):
    mesh = col.mesh
    # value_and_grad: a train step returns the loss, which keeps the forward alive
    fn = nnx.jit(nnx.value_and_grad(_loss, argnums=(0, 1, 2) if input_grad else (0, 1)))
    report = audit.collectives(fn, col, row, x, cot, mesh=mesh)
    declared = col.declared_collectives(x.shape, grad=True, input_grad=input_grad)
    declared += row.declared_collectives((*x.shape[:-1], F), grad=True)
    batch = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    declared.append(audit.Declared("all-reduce", batch, "f32", 1, 4, "the loss (a scalar)"))
    return report, audit.compare(declared, report)


@pytest.mark.parametrize(("reshard", "gathers"), [(True, 6), (False, 4)], ids=["reshard", "keep"])
def test_fsdp_step_collectives(reshard, gathers):
    """Per step: reshard_after_forward=True gathers each kernel twice, False once.

    2 kernels + 2 biases: True = 2*2 + 2 = 6 all-gathers (a bias's value is
    not needed by the backward, so it is not re-gathered), False = 4; 4
    reduce-scatters either way; the data axis all-reduces only the 1/fsdp
    shards; nothing parameter-sized is all-reduced over fsdp.
    """
    mesh = utils.mesh(2, 2, 2)
    col, row = _mlp(mesh, reshard=reshard)
    x, cot = _inputs()
    report, comparison = _audit(col, row, x, cot)
    assert comparison.ok, comparison.table()
    counts = report.counts()
    assert counts[("all-gather", ("fsdp",), "f32")] == gathers
    assert counts[("reduce-scatter", ("fsdp",), "f32")] == 4
    # the only all-reduces: model (activations) and data (gradient shards)
    kernel_shard = D * F // 4 * 4  # [D/fsdp, F/model] f32 on (2, 2, 2)
    for c in report.where("all-reduce"):
        assert "fsdp" not in c.axes or c.bytes == 4, c  # only the scalar loss
    data_bytes = sum(c.bytes for c in report.where("all-reduce", ("data",)))
    assert data_bytes == 2 * kernel_shard + (F // 4 + D // 2) * 4
    # the kernels' reduce-scatters move the model-local kernel, not the whole one
    rs = sorted(c.bytes for c in report.where("reduce-scatter"))
    assert rs[-2:] == [D * F // 2 * 4, D * F // 2 * 4]


def test_fsdp_first_layer_without_input_grad_gathers_once():
    """Without an input gradient the column kernel's value is dead in the backward:
    XLA drops its re-gather, and the declaration says so."""
    mesh = utils.mesh(1, 4, 2)
    col, row = _mlp(mesh)
    x, cot = _inputs()
    report, comparison = _audit(col, row, x, cot, input_grad=False)
    assert comparison.ok, comparison.table()
    assert report.counts()[("all-gather", ("fsdp",), "f32")] == 5


def test_mixed_precision_linears():
    """bf16 gather (as u16 bits, half the bytes), bf16 compute, f32 reduce-scatter."""
    mesh = utils.mesh(1, 8, 1)
    policy = MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)
    col, row = _mlp(mesh, policy=policy)
    x, cot = _inputs()
    params = [np.asarray(p[...]) for p in (col.kernel, col.bias, row.kernel, row.bias)]
    y = nnx.jit(lambda c, r, x: r(jax.nn.relu(c(x))))(col, row, x)
    assert y.dtype == jnp.bfloat16
    bf = lambda a: jnp.asarray(a).astype(jnp.bfloat16)
    w1, b1, w2, b2 = params
    ref_y = jax.nn.relu(bf(x) @ bf(w1) + bf(b1)[None]) @ bf(w2) + bf(b2)[None]
    utils.assert_close(y, ref_y, jnp.bfloat16)

    gc, gr, gx = nnx.jit(nnx.grad(_loss, argnums=(0, 1, 2)))(col, row, x, cot)
    ref = _reference(params, np.asarray(x), cot, jnp.bfloat16)
    got = (gc["kernel"][...], gc["bias"][...], gr["kernel"][...], gr["bias"][...], gx)
    for name, g, r in zip(("dW1", "db1", "dW2", "db2", "dx"), got, ref, strict=True):
        assert g.dtype == jnp.float32, name  # stored dtype
        utils.assert_close(g, r, jnp.bfloat16, name)

    report, comparison = _audit(col, row, x, cot)
    assert comparison.ok, comparison.table()
    gathers = report.where("all-gather")
    assert {c.dtype for c in gathers} == {"u16"}  # bf16 bits: 2 bytes per element
    assert {c.dtype for c in report.where("reduce-scatter")} == {"f32"}
    # the gathered kernel moves half the bytes of its f32 gradient's reduce-scatter
    assert max(c.bytes for c in gathers) * 2 == max(c.bytes for c in report.where("reduce-scatter"))


def test_fsdp_axis_default_and_off():
    mesh = utils.mesh(1, 4, 2)
    col = shardlax.nn.ColumnParallelLinear(D, F, mesh=mesh, rngs=nnx.Rngs(0))
    assert col.fsdp_axis == "fsdp" and col.kernel_spec == P("fsdp", "model")
    off = shardlax.nn.ColumnParallelLinear(D, F, mesh=mesh, rngs=nnx.Rngs(0), fsdp_axis=None)
    assert off.kernel_spec == P(None, "model")
    # same values whatever the layout, and the same as nnx.Linear's
    ref = nnx.Linear(D, F, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(col.kernel[...]), np.asarray(ref.kernel[...]))
    np.testing.assert_array_equal(np.asarray(off.kernel[...]), np.asarray(ref.kernel[...]))
    raw = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    assert shardlax.nn.RowParallelLinear(4, 4, mesh=raw, rngs=nnx.Rngs(0)).fsdp_axis is None


def test_error_fsdp_axis_missing():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(fsdp_axis='fsdp'\): mesh axis 'fsdp' is not in the mesh, "
        r"whose axes are \('data', 'model'\) with sizes \(2, 2\)\. Pass fsdp_axis=",
    ):
        shardlax.nn.ColumnParallelLinear(8, 8, mesh=mesh, fsdp_axis="fsdp", rngs=nnx.Rngs(0))


def test_error_fsdp_not_dividing():
    mesh = utils.mesh(1, 4, 2)
    with pytest.raises(
        ValueError,
        match=r"RowParallelLinear\(out_features=6\) cannot be sharded over mesh axes \('fsdp',\) "
        r"\(size 4\) for FSDP: 4 does not divide 6 .*Choose out_features divisible by 4.*"
        r"or pass fsdp_axis=None",
    ):
        shardlax.nn.RowParallelLinear(8, 6, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(out_features=12\) cannot be sharded over mesh axes "
        r"\('model', 'fsdp'\) \(size 8\) for FSDP: 8 does not divide 12",
    ):
        shardlax.nn.ColumnParallelLinear(8, 12, mesh=mesh, rngs=nnx.Rngs(0))


def test_error_fsdp_axis_not_a_batch_axis():
    mesh = utils.mesh(2, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(fsdp_axis='fsdp', batch_axes=\('data',\)\): the batch "
        r"must be split over the fsdp axis \(mesh axis 'fsdp', size 2\).*Add 'fsdp' to batch_axes",
    ):
        shardlax.nn.ColumnParallelLinear(
            8, 8, mesh=mesh, batch_axes=("data",), fsdp_axis="fsdp", rngs=nnx.Rngs(0)
        )


def test_error_bad_mixed_precision():
    mesh = utils.mesh(1, 2, 1)
    with pytest.raises(TypeError, match=r"mixed_precision='bf16'\): expected a .*MixedPrecision"):
        shardlax.nn.ColumnParallelLinear(8, 8, mesh=mesh, mixed_precision="bf16", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"MixedPrecision\(param_dtype=<class 'jax.numpy.int8'>"):
        MixedPrecision(param_dtype=jnp.int8)
