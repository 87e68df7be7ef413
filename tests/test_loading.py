"""Weights loaded the ordinary way (host / unsharded arrays), then a shardlax layer is called.

`param.set_value(numpy_array)`, `nnx.update(model, host_state)` and
`param[...] = x` leave a parameter unsharded; on an Explicit mesh (shardlax's
default) a layer's `shard_map` used to refuse it ("in_specs ... does not
match"). Layers now place it where their spec says (eagerly: one explicit
device_put, stored back; under jit: a sharding constraint). The reference is
the same values loaded into the plain flax layer on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax.nn import (
    ColumnParallelLinear,
    ParallelEinsum,
    ParallelEmbed,
    RMSNorm,
    RowParallelLinear,
    place_params,
)
from tests import utils

MESH = (2, 2, 2)  # data, fsdp, model: every layer is tensor-parallel and FSDP-sharded


def _cases(mesh):
    """name -> (shardlax layer, plain flax layer, input, method)."""
    r = nnx.Rngs
    ids = np.random.RandomState(3).randint(0, 16, (8, 3))
    x = np.random.RandomState(4).randn(8, 3, 8).astype(np.float32)
    return {
        "column": (
            ColumnParallelLinear(8, 16, mesh=mesh, rngs=r(0)),
            nnx.Linear(8, 16, rngs=r(1)),
            x,
            "__call__",
        ),
        "row": (
            RowParallelLinear(8, 16, mesh=mesh, rngs=r(0)),
            nnx.Linear(8, 16, rngs=r(1)),
            x,
            "__call__",
        ),
        "embed": (
            ParallelEmbed(16, 8, mesh=mesh, rngs=r(0)),
            nnx.Embed(16, 8, rngs=r(1)),
            ids,
            "__call__",
        ),
        "attend": (
            ParallelEmbed(16, 8, mesh=mesh, rngs=r(0)),
            nnx.Embed(16, 8, rngs=r(1)),
            x,
            "attend",
        ),
        "einsum": (
            ParallelEinsum("BSD,DF->BSF", (8, 16), (16,), shard_dim=1, mesh=mesh, rngs=r(0)),
            nnx.Einsum("BSD,DF->BSF", (8, 16), (16,), rngs=r(1)),
            x,
            "__call__",
        ),
        "rmsnorm": (RMSNorm(8, mesh=mesh, rngs=r(0)), nnx.RMSNorm(8, rngs=r(1)), x, "__call__"),
    }


def _host_values(layer, seed):
    """New host (numpy) values for every parameter: unlike the init, so ignoring them fails."""
    state = nnx.state(layer, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    rs = np.random.RandomState(seed)
    return jax.tree.unflatten(tree, [rs.randn(*x.shape).astype(np.float32) for x in leaves])


def _load(layer, host, how, mesh=None):
    if how == "update":
        nnx.update(layer, host)
        return
    for path, var in nnx.iter_graph(layer):
        if not isinstance(var, nnx.Param):
            continue
        value = host[path[-1]]
        if how == "set_value":
            var.set_value(value)
        else:  # `param[...] = jnp_array`: on an Explicit mesh JAX needs the mesh set for it
            with jax.set_mesh(mesh) if mesh is not None else _nullcontext():
                var[...] = jnp.asarray(value)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _loss_and_grads(method):
    def loss(m, x):
        y = getattr(m, method)(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    return nnx.jit(nnx.value_and_grad(loss))


#: every way of loading on one layer; the common one (`nnx.update`) on every layer
LOADS = [("column", "set_value"), ("column", "setitem")] + [
    (name, "update") for name in ("column", "row", "embed", "attend", "einsum", "rmsnorm")
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name,how", LOADS, ids=[f"{n}-{h}" for n, h in LOADS])
def test_loaded_weights_equal_plain_flax(name, how, mode):
    mesh = utils.mesh(*MESH)
    layer, ref, x, method = _cases(mesh)[name]
    host = _host_values(layer, seed=7)
    _load(layer, host, how, mesh)
    _load(ref, host, "set_value" if how == "setitem" else how)
    want = getattr(ref, method)(x)
    if mode == "eager":
        got = getattr(layer, method)(x)
        for pname, var in vars(layer).items():  # placed once and stored back
            if isinstance(var, nnx.Param):
                utils.assert_sharding(var[...], mesh, getattr(layer, f"{pname}_spec"))
    else:
        got = nnx.jit(lambda m, x: getattr(m, method)(x))(layer, x)
    utils.assert_close(got, want)
    got_l, got_g = _loss_and_grads(method)(layer, x)
    want_l, want_g = _loss_and_grads(method)(ref, x)
    utils.assert_close(got_l, want_l)
    for (path, g), (_, w) in zip(
        jax.tree_util.tree_flatten_with_path(got_g)[0],
        jax.tree_util.tree_flatten_with_path(want_g)[0],
        strict=True,
    ):
        utils.assert_close(g, w, err_msg=jax.tree_util.keystr(path))


def test_place_params_places_every_shardlax_layer_and_leaves_flax_layers():
    mesh = utils.mesh(*MESH)

    class Model(nnx.Module):
        def __init__(self):
            self.up = ColumnParallelLinear(8, 16, mesh=mesh, rngs=nnx.Rngs(0))
            self.down = RowParallelLinear(16, 8, mesh=mesh, rngs=nnx.Rngs(1))
            self.plain = nnx.Linear(8, 8, rngs=nnx.Rngs(2))

        def __call__(self, x):
            return self.plain(self.down(jax.nn.relu(self.up(x))))

    model = Model()
    host = _host_values(model, seed=5)
    nnx.update(model, host)
    assert isinstance(model.up.kernel[...], np.ndarray)
    assert place_params(model) is model
    for layer in (model.up, model.down):
        for pname in ("kernel", "bias"):
            utils.assert_sharding(getattr(layer, pname)[...], mesh, getattr(layer, f"{pname}_spec"))
            stored = host["up" if layer is model.up else "down"][pname]
            np.testing.assert_array_equal(np.asarray(getattr(layer, pname)[...]), stored)
    assert isinstance(model.plain.kernel[...], np.ndarray)  # plain flax: left as loaded


def test_other_layout_under_jit_is_an_error_and_moved_eagerly():
    mesh = utils.mesh(*MESH)
    layer = ColumnParallelLinear(8, 16, mesh=mesh, rngs=nnx.Rngs(0))
    assert layer.kernel_spec == P("fsdp", "model")
    x = np.ones((8, 8), np.float32)
    want = np.asarray(layer(x))
    other = jax.device_put(layer.kernel[...], NamedSharding(mesh, P("model", "fsdp")))
    layer.kernel.set_value(other)
    with pytest.raises(
        ValueError,
        match=r"ColumnParallelLinear: parameter 'kernel' \(float32\[8, 16\]\) arrives under jit "
        r"laid out as P\('model', 'fsdp'\) over mesh axes \{'model': 2, 'fsdp': 2\}, but the "
        r"layer stores it as P\('fsdp', 'model'\).*layer.kernel.set_value\(jax.device_put\(",
    ):
        nnx.jit(lambda m, x: m(x))(layer, x)
    utils.assert_close(layer(x), want)  # eager: moved by one explicit device_put
    utils.assert_sharding(layer.kernel[...], mesh, P("fsdp", "model"))


def test_auto_mesh_loaded_weights():
    mesh = utils.mesh(*MESH, axis_types="auto")
    layer = ColumnParallelLinear(8, 16, mesh=mesh, rngs=nnx.Rngs(0))
    ref = nnx.Linear(8, 16, rngs=nnx.Rngs(1))
    host = _host_values(layer, seed=2)
    nnx.update(layer, host)
    nnx.update(ref, host)
    x = np.random.RandomState(0).randn(8, 8).astype(np.float32)
    utils.assert_close(nnx.jit(lambda m, x: m(x))(layer, x), ref(x))
    utils.assert_close(layer(x), ref(x))
    utils.assert_sharding(layer.kernel[...], mesh, layer.kernel_spec)
