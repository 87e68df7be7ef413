"""Non-finite values under FSDP behave as on one device (issue 9, requirement 6).

One -inf input element, or one NaN cotangent element, must reach exactly the
outputs and gradients it reaches in the unwrapped computation: the gathers'
ordering tie (kernels/_fsdp.py `_tie_to`) must not turn every parameter NaN.
References: the unwrapped flax module on one device, or plain jnp on the full
arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from shardlax.fsdp import fully_shard
from tests import utils

D, F, B = 8, 16, 8


def assert_same_values(actual, expected, err_msg="", *, mixed=True):
    """Same NaN / +inf / -inf positions, and the finite values within the tolerance table.

    `mixed`: the reference must hold both finite and non-finite values (so the
    case tests what it claims)."""
    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    for name, test in (("nan", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        np.testing.assert_array_equal(test(a), test(e), err_msg=f"{err_msg}: {name} positions")
    finite = np.isfinite(e)
    assert finite.any() and (not mixed or not finite.all()), f"{err_msg}: not a mixed case"
    utils.assert_close(np.where(finite, a, 0.0), np.where(finite, e, 0.0), err_msg=err_msg)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def _bad_input():
    x = np.array(jax.random.normal(jax.random.key(0), (B, D)))
    x[4, 0] = -np.inf  # one example, one feature (e.g. log(0)); first of a shard
    return x


def _bad_cotangent():
    cot = np.array(jax.random.normal(jax.random.key(1), (B, D)))
    cot[4, 0] = np.nan  # one example, one output; first of a shard
    return cot


def _loss(m, x, cot):
    return jnp.sum(m(x) * cot)


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fully_shard_nonfinite_input_and_cotangent(reshard):
    mesh = utils.mesh(1, 4, 1)
    ref = MLP(nnx.Rngs(0))
    unit = fully_shard(MLP(nnx.Rngs(0)), mesh=mesh, reshard_after_forward=reshard)
    grad = nnx.grad(_loss, argnums=(0, 1))
    jitted = nnx.jit(grad)
    for name, x, cot in (
        ("-inf input", _bad_input(), np.ones((B, D), np.float32)),
        (
            "NaN cotangent",
            np.asarray(jax.random.normal(jax.random.key(2), (B, D))),
            _bad_cotangent(),
        ),
    ):
        if name == "-inf input":
            y = nnx.jit(lambda m, x: m(x))(unit, x)
            assert_same_values(y, ref(x), f"{name}: forward")
        g, gx = jitted(unit, x, cot)
        g_ref, gx_ref = grad(ref, x, cot)
        assert_same_values(gx, gx_ref, f"{name}: dx", mixed=name != "-inf input")
        for part in ("up", "down"):
            got, want = g[part]["kernel"][...], g_ref[part]["kernel"][...]
            if np.isfinite(want).all() or not np.isfinite(want).any():
                np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=part)
            else:
                assert_same_values(got, want, f"{name}: d{part}.kernel")


def _tp_mlp(mesh, reshard):
    kw = dict(mesh=mesh, reshard_after_forward=reshard)
    col = shardlax.nn.ColumnParallelLinear(D, F, rngs=nnx.Rngs(0), **kw)
    row = shardlax.nn.RowParallelLinear(F, D, rngs=nnx.Rngs(1), **kw)
    return col, row


def _tp_reference(col, row):
    w1, b1, w2, b2 = (np.asarray(p[...]) for p in (col.kernel, col.bias, row.kernel, row.bias))

    def loss(w1, w2, x, cot):
        return jnp.sum((jax.nn.relu(x @ w1 + b1[None]) @ w2 + b2[None]) * cot)

    def fwd(x):
        return jax.nn.relu(x @ w1 + b1[None]) @ w2 + b2[None]

    return fwd, jax.grad(loss, argnums=(0, 1, 2)), (w1, w2)


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_parallel_linears_with_fsdp_nonfinite(reshard):
    mesh = utils.mesh(1, 2, 2)
    col, row = _tp_mlp(mesh, reshard)
    fwd, ref_grad, (w1, w2) = _tp_reference(col, row)

    def loss(col, row, x, cot):
        return jnp.sum(row(jax.nn.relu(col(x))) * cot)

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))
    x = _bad_input()
    y = nnx.jit(lambda c, r, x: r(jax.nn.relu(c(x))))(col, row, x)
    assert_same_values(y, fwd(x), "-inf input: forward")
    ones = np.ones((B, D), np.float32)
    _, _, gx = grad(col, row, x, ones)
    _, _, gx_ref = ref_grad(w1, w2, x, ones)
    assert_same_values(gx, gx_ref, "-inf input: dx", mixed=False)

    x = np.asarray(jax.random.normal(jax.random.key(2), (B, D)))
    gc, gr, gx = grad(col, row, x, _bad_cotangent())
    gw1, gw2, gx_ref = ref_grad(w1, w2, x, _bad_cotangent())
    np.testing.assert_array_equal(np.isnan(gc["kernel"][...]), np.isnan(gw1), "col kernel")
    assert_same_values(gx, gx_ref, "NaN cotangent: dx")
    assert_same_values(gr["kernel"][...], gw2, "NaN cotangent: row kernel")
