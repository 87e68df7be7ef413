"""Drop-in: the parallel linears are `nnx.Linear` with a different layout, not different math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shardlax
from tests import utils


@pytest.mark.parametrize("cls", ["ColumnParallelLinear", "RowParallelLinear"])
@pytest.mark.parametrize(
    "inits",
    [
        {},
        {
            "kernel_init": nnx.initializers.normal(0.3),
            "bias_init": nnx.initializers.uniform(),
        },
    ],
    ids=["default-init", "custom-init"],
)
def test_parameters_equal_nnx_linear(cls, inits):
    mesh = utils.mesh(data=2, model=4)
    layer = getattr(shardlax.nn, cls)(24, 40 if cls[0] == "C" else 8, mesh=mesh,
                                       rngs=nnx.Rngs(7), **inits)  # fmt: skip
    ref = nnx.Linear(24, 40 if cls[0] == "C" else 8, rngs=nnx.Rngs(7), **inits)
    ours, theirs = nnx.state(layer, nnx.Param), nnx.state(ref, nnx.Param)
    assert set(ours.keys()) == set(theirs.keys()) == {"kernel", "bias"}
    for name in ("kernel", "bias"):
        a, b = ours[name][...], theirs[name][...]
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = layer.kernel_spec
    utils.assert_sharding(layer.kernel[...], mesh, want)
    assert nnx.get_partition_spec(ours)["kernel"] == want


class FlaxMLP(nnx.Module):
    def __init__(self, d, f, rngs):
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class ParallelMLP(nnx.Module):
    def __init__(self, d, f, rngs, mesh):
        self.up = shardlax.nn.ColumnParallelLinear(d, f, rngs=rngs, mesh=mesh)
        self.down = shardlax.nn.RowParallelLinear(f, d, rngs=rngs, mesh=mesh)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.standard_dtype_promotion
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4), (4, 2)], ids=str)
def test_mlp_outputs_gradients_and_adam_training_equal_flax(mesh_shape):
    mesh = utils.mesh(data=mesh_shape[0], model=mesh_shape[1])
    d, f = 16, 64
    ours, ref = ParallelMLP(d, f, nnx.Rngs(0), mesh), FlaxMLP(d, f, nnx.Rngs(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = jax.random.normal(kx, (8, 4, d)), jax.random.normal(ky, (8, 4, d))

    out = nnx.jit(lambda m, x: m(x))(ours, x)
    utils.assert_close(out, ref(x))
    g_ours = nnx.jit(nnx.grad(_loss))(ours, x, y)
    g_ref = nnx.grad(_loss)(ref, x, y)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
        utils.assert_close(a, b)

    opt_ours = nnx.Optimizer(ours, optax.adam(1e-2), wrt=nnx.Param)
    opt_ref = nnx.Optimizer(ref, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        loss_ours = step(ours, opt_ours, x, y)
        loss_ref = step(ref, opt_ref, x, y)
        utils.assert_close(loss_ours, loss_ref)
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours, nnx.Param)),
        jax.tree.leaves(nnx.state(ref, nnx.Param)),
        strict=True,
    ):
        utils.assert_close(a, b)
    # the trained parameters keep their layout
    utils.assert_sharding(ours.up.kernel[...], mesh, ours.up.kernel_spec)
    utils.assert_sharding(ours.down.kernel[...], mesh, ours.down.kernel_spec)
