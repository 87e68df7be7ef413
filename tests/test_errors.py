"""Bad input fails at trace time with a message that names the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh

import shardlax
from shardlax.nn import ColumnParallelLinear, RowParallelLinear
from tests import utils


def test_out_features_not_divisible_by_model_axis():
    mesh = utils.mesh(model=8)
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(out_features=1002\) cannot be sharded over mesh axis "
        r"'model' \(size 8\): 8 does not divide 1002\. Choose out_features divisible by 8",
    ):
        ColumnParallelLinear(16, 1002, mesh=mesh, rngs=nnx.Rngs(0))


def test_in_features_not_divisible_by_model_axis():
    mesh = utils.mesh(data=2, model=4)
    with pytest.raises(
        ValueError,
        match=r"RowParallelLinear\(in_features=30\) cannot be sharded over mesh axis 'model' "
        r"\(size 4\): 4 does not divide 30\. Choose in_features divisible by 4, or a mesh",
    ):
        RowParallelLinear(30, 16, mesh=mesh, rngs=nnx.Rngs(0))


def test_unknown_axis_name():
    mesh = utils.mesh(data=2, model=4)
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(axis_name='tensor'\): mesh axis 'tensor' is not in the "
        r"mesh, whose axes are \('data', 'fsdp', 'model'\) with sizes \(2, 1, 4\)\. Pass "
        r"axis_name= one of",
    ):
        ColumnParallelLinear(16, 32, mesh=mesh, axis_name="tensor", rngs=nnx.Rngs(0))


def test_unknown_batch_axis():
    mesh = utils.mesh(data=2, model=4)
    with pytest.raises(ValueError, match=r"RowParallelLinear\(batch_axes='replica'\): mesh axis"):
        RowParallelLinear(16, 32, mesh=mesh, batch_axes=("replica",), rngs=nnx.Rngs(0))


def test_model_axis_cannot_split_the_batch():
    mesh = utils.mesh(data=2, model=4)
    with pytest.raises(ValueError, match=r"Remove 'model' from batch_axes"):
        ColumnParallelLinear(16, 32, mesh=mesh, batch_axes=("data", "model"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_input_last_dim_mismatch(cls):
    mesh = utils.mesh(data=2, model=4)
    layer = cls(16, 32, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=rf"{cls.__name__}\(in_features=16\): inputs.shape\[-1\] is 12, expected 16 "
        r"\(inputs.shape=\(4, 12\)\)\. Pass inputs whose last dim is 16, or build the layer "
        r"with in_features=12",
    ):
        nnx.jit(lambda m, x: m(x))(layer, jnp.ones((4, 12)))


def test_batch_not_divisible_by_data_axes():
    mesh = utils.mesh(data=4, model=2)
    layer = ColumnParallelLinear(16, 32, mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear: inputs.shape\[0\]=6 \(the batch\) cannot be sharded over "
        r"mesh axes \('data', 'fsdp'\) \(size 4\): 4 does not divide 6\. Use a batch size "
        r"divisible by 4",
    ):
        nnx.jit(lambda m, x: m(x))(layer, jnp.ones((6, 16)))


def test_no_mesh():
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear\(mesh=None\): no mesh was given and none is set with "
        r"jax.set_mesh\. Pass mesh=shardlax.make_mesh",
    ):
        ColumnParallelLinear(16, 32, rngs=nnx.Rngs(0))


def test_mesh_of_wrong_type():
    with pytest.raises(TypeError, match=r"RowParallelLinear\(mesh=\(2, 4\)\): expected a jax"):
        RowParallelLinear(16, 32, mesh=(2, 4), rngs=nnx.Rngs(0))


def test_mixed_axis_types():
    utils.need_devices(8)
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto))
    with pytest.raises(ValueError, match=r"ColumnParallelLinear: mesh axis types .* are mixed"):
        ColumnParallelLinear(16, 32, mesh=mesh, rngs=nnx.Rngs(0))


def test_make_mesh_needs_enough_devices():
    n = jax.device_count()
    with pytest.raises(
        ValueError,
        match=rf"make_mesh\(data=2, fsdp=1, model={n}\) needs {2 * n} devices but {n} are "
        r"available\. Choose sizes whose product",
    ):
        shardlax.make_mesh(data=2, model=n)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_make_mesh_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match=r"make_mesh\(model=.*\): an axis size must be a positive"):
        shardlax.make_mesh(model=bad)


def test_make_mesh_rejects_unknown_axis_type():
    with pytest.raises(ValueError, match=r"make_mesh\(axis_types='manual'\): expected"):
        shardlax.make_mesh(axis_types="manual")


def test_make_mesh_keeps_size_one_axes():
    mesh = utils.mesh(data=2, model=4)
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "model": 4}
    assert set(mesh.axis_types) == {AxisType.Explicit}
    auto = shardlax.make_mesh(model=2, axis_types="auto")
    assert set(auto.axis_types) == {AxisType.Auto}
