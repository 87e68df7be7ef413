"""Column/RowParallelLinear equal single-device math, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import shardlax
from tests import utils


@st.composite
def linear_case(draw, data: int, model: int, shard_in: bool):
    """Shapes whose sharded dims are multiples of the axis sizes, by construction."""
    n_lead = draw(st.integers(1, 3))
    lead = [draw(st.integers(1, 2)) * data] + [draw(st.integers(1, 3)) for _ in range(n_lead - 1)]
    in_f = draw(st.integers(1, 3)) * (model if shard_in else 1) * draw(st.sampled_from([1, 4]))
    out_f = draw(st.integers(1, 3)) * (1 if shard_in else model) * draw(st.sampled_from([1, 4]))
    return dict(
        lead=tuple(lead),
        in_f=in_f,
        out_f=out_f,
        use_bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_layer(layer_cls, mesh, case, **layer_kwargs):
    k = jax.random.split(jax.random.key(case["seed"]), 4)
    in_f, out_f, dtype = case["in_f"], case["out_f"], case["dtype"]
    layer = layer_cls(
        in_f, out_f, use_bias=case["use_bias"], dtype=dtype, mesh=mesh, rngs=nnx.Rngs(case["seed"]),
        **layer_kwargs,
    )  # fmt: skip
    if case["use_bias"]:  # a non-zero bias, so a bias counted N times would show
        b = jax.random.normal(k[0], (out_f,))
        layer.bias[...] = jax.device_put(b, layer.bias[...].sharding)
    x = jax.random.normal(k[1], (*case["lead"], in_f))
    cot = jax.random.normal(k[2], (*case["lead"], out_f))
    kernel = np.asarray(layer.kernel[...])
    bias = np.asarray(layer.bias[...]) if case["use_bias"] else None

    # forward, under jit and eagerly
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    reference = jax.jit(utils.reference_linear, static_argnums=3)  # one compile, not one per op
    y_ref = reference(x, jnp.asarray(kernel), None if bias is None else jnp.asarray(bias), dtype)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    utils.assert_close(y, y_ref, dtype, "forward (jit)")
    with jax.set_mesh(mesh):
        utils.assert_close(layer(x), y_ref, dtype, "forward (eager)")

    # gradients w.r.t. input, kernel and bias: ratio 1, never the mesh size
    def loss(m, x):
        return jnp.sum(m(x).astype(jnp.float32) * cot)

    grads, dx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)

    def ref_loss(x, w, b):
        return jnp.sum(utils.reference_linear(x, w, b, dtype).astype(jnp.float32) * cot)

    argnums = (0, 1, 2) if case["use_bias"] else (0, 1)
    ref = jax.jit(jax.grad(ref_loss, argnums=argnums))(
        x, jnp.asarray(kernel), None if bias is None else jnp.asarray(bias)
    )
    utils.assert_close(dx, ref[0], dtype, "d input")
    utils.assert_close(grads["kernel"][...], ref[1], dtype, "d kernel")
    assert grads["kernel"][...].dtype == jnp.float32
    if case["use_bias"]:
        utils.assert_close(grads["bias"][...], ref[2], dtype, "d bias")
    return layer, y


@pytest.mark.parametrize("mesh_shape", utils.DATA_MODEL_MESHES, ids=str)
@given(data=st.data())
def test_column_parallel_matches_reference(mesh_shape, data):
    d, m = mesh_shape
    mesh = utils.mesh(data=d, model=m)
    case = data.draw(linear_case(d, m, shard_in=False))
    gather = data.draw(st.booleans())
    layer, y = _check_layer(shardlax.nn.ColumnParallelLinear, mesh, case, gather_output=gather)
    utils.assert_sharding(y, layer.mesh, layer.output_spec(y.ndim))


@pytest.mark.parametrize("mesh_shape", utils.DATA_MODEL_MESHES, ids=str)
@given(data=st.data())
def test_row_parallel_matches_reference(mesh_shape, data):
    d, m = mesh_shape
    mesh = utils.mesh(data=d, model=m)
    case = data.draw(linear_case(d, m, shard_in=True))
    parallel = data.draw(st.booleans())
    layer, y = _check_layer(shardlax.nn.RowParallelLinear, mesh, case, input_is_parallel=parallel)
    utils.assert_sharding(y, layer.mesh, layer.output_spec(y.ndim))


def test_row_bias_gradient_not_multiplied_by_model_size():
    """The classic bug: a bias added before the all-reduce gets N times its gradient."""
    mesh = utils.mesh(data=1, model=8)
    layer = shardlax.nn.RowParallelLinear(16, 4, mesh=mesh, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 16))
    g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x))))(layer)
    np.testing.assert_array_equal(np.asarray(g["bias"][...]), np.full((4,), 2.0, np.float32))


@pytest.mark.parametrize("kind", ["explicit", "auto", "raw"])
def test_mesh_kinds_and_presharded_inputs(kind):
    """Explicit and Auto meshes, a raw `Mesh`, and inputs that are already sharded."""
    utils.need_devices(8)
    if kind == "raw":
        devices = np.array(jax.devices()[:8]).reshape(2, 4)
        mesh = jax.sharding.Mesh(devices, ("data", "model"))
    else:
        mesh = shardlax.make_mesh(data=2, model=4, axis_types=kind)
    col = shardlax.nn.ColumnParallelLinear(8, 16, mesh=mesh, rngs=nnx.Rngs(0))
    row = shardlax.nn.RowParallelLinear(16, 8, mesh=mesh, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (4, 8))
    ref = jax.nn.relu(x @ np.asarray(col.kernel[...])) @ np.asarray(row.kernel[...])
    for inputs in (x, jax.device_put(x, jax.sharding.NamedSharding(mesh, col.input_spec(2)))):
        y = nnx.jit(lambda c, r, x: r(jax.nn.relu(c(x))))(col, row, inputs)
        utils.assert_close(y, ref)
        utils.assert_sharding(y, mesh, row.output_spec(2))


def test_mesh_from_set_mesh():
    mesh = utils.mesh(data=2, model=4)
    with jax.set_mesh(mesh):
        col = shardlax.nn.ColumnParallelLinear(8, 16, rngs=nnx.Rngs(0))
    assert col.mesh == mesh
    assert col.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model")
