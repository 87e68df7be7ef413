"""`fully_shard_scan`: state the scanned layers update comes back, as from a loop on one device.

Every layer of the stack may update Variables (BatchNorm statistics, a
counter, its Dropout rng count) or advance an `nnx.Rngs` passed at call. The
reference is the same stack applied by a Python loop over its layers on one
device (plain flax, no shardlax): outputs, parameter gradients and every
updated Variable. What a scan cannot carry is a clear error, never dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlax.fsdp import fully_shard_scan
from tests import utils

L, B, D = 3, 8, 8


class Count(nnx.Variable):
    pass


class Layer(nnx.Module):
    """Linear -> BatchNorm (training) -> Dropout (own rngs), a residual and a call counter."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.bn = nnx.BatchNorm(D, use_running_average=False, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.calls = Count(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return x + self.drop(self.bn(self.lin(x)))


class CallRngsLayer(nnx.Module):
    """Dropout whose key comes from the `nnx.Rngs` passed at call."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs):
        return x + self.drop(jnp.tanh(self.lin(x)), rngs=rngs)


def _stack(make):
    """The stack as flax's scan-over-layers pattern builds it (what fully_shard_scan wraps)."""

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(nnx.Rngs(0))


def _loop_reference(make, x, w, call_rngs=None):
    """One device: the layers applied one after another by a Python loop, and d(loss)/d(params)."""
    graphdef, params, rest = nnx.split(_stack(make), nnx.Param, ...)
    rngs_def, rngs_state = nnx.split(call_rngs) if call_rngs is not None else (None, None)

    def loss(params, rest, rngs_state, x):
        h, new_rest = x, []
        fresh = jax.tree.map(lambda a: a, rngs_state)  # Variables of this trace level
        rngs = nnx.merge(rngs_def, fresh) if rngs_def is not None else None
        for i in range(L):
            take = lambda a, i=i: a[i]
            layer = nnx.merge(graphdef, jax.tree.map(take, params), jax.tree.map(take, rest))
            h = layer(h) if rngs is None else layer(h, rngs)
            new_rest.append(nnx.state(layer, nnx.Not(nnx.Param)))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *new_rest)
        out_rngs = nnx.state(rngs) if rngs is not None else None
        return jnp.sum(jnp.sin(h) * w), (h, stacked, out_rngs)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss1, (h, rest1, rngs1)), g = grad(params, rest, rngs_state, x)
    # a second step from the updated state: the statistics and rng counts it used matter
    (l2, (h2, rest2, rngs2)), g2 = grad(params, rest1, rngs1, x)
    return [(loss1, h, g, rest1, rngs1), (l2, h2, g2, rest2, rngs2)]


def _unit_steps(model, x, w, call_rngs=None):
    def loss(m, x, rngs):
        h = m(x) if rngs is None else m(x, rngs=rngs)
        return jnp.sum(jnp.sin(h) * w), h

    step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    out = []
    for _ in range(2):
        (value, h), g = step(model, x, call_rngs)
        copy = lambda v: jax.tree.map(lambda a: a, v)  # a state holds live Variables
        rest = copy(nnx.state(model, nnx.Not(nnx.Param)))
        rngs = None if call_rngs is None else copy(nnx.state(call_rngs))
        out.append((value, h, g, rest, rngs))
    return out


def _assert_state_equal(got, want):
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        if jnp.issubdtype(g.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        if jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
            utils.assert_close(g, w, err_msg=jax.tree_util.keystr(path))
        else:  # counters, rng counts and keys: exactly
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", [True, False], ids=["remat", "reshard"])
def test_scanned_state_equals_a_loop_on_one_device(remat):
    """Both paths of a scan step: under jax.checkpoint, and through fsdp_call's re-gather."""
    mesh = utils.mesh(2, 2, 1)
    x = jax.random.normal(jax.random.key(1), (B, D))
    w = jax.random.normal(jax.random.key(2), (B, D))
    want = _loop_reference(Layer, x, w)
    model = fully_shard_scan(
        Layer, L, rngs=nnx.Rngs(0), mesh=mesh, remat=remat, reshard_after_forward=True
    )
    got = _unit_steps(model, x, w)
    for step, ((gl, gh, gg, grest, _), (wl, wh, wg, wrest, _)) in enumerate(
        zip(got, want, strict=True)
    ):
        utils.assert_close(gh, wh, err_msg=f"step {step} output")
        utils.assert_close(gl, wl, err_msg=f"step {step} loss")
        for (path, a), (_, b) in zip(
            jax.tree_util.tree_flatten_with_path(gg)[0],
            jax.tree_util.tree_flatten_with_path(wg)[0],
            strict=True,
        ):
            utils.assert_close(a, b, err_msg=f"step {step} grad {jax.tree_util.keystr(path)}")
        _assert_state_equal(grest, wrest)
    # the state did move: two calls per layer, running averages off their init, masks drawn
    rest = nnx.state(model, nnx.Not(nnx.Param))
    np.testing.assert_array_equal(np.asarray(rest["calls"][...]), [2] * L)
    assert float(jnp.min(jnp.abs(rest["bn"]["mean"][...]))) > 0
    np.testing.assert_array_equal(np.asarray(rest["drop"]["rngs"]["count"][...]), [2] * L)


def test_rngs_at_call_advance_through_the_layers_as_in_a_loop():
    mesh = utils.mesh(1, 4, 1)
    x = jax.random.normal(jax.random.key(1), (B, D))
    w = jax.random.normal(jax.random.key(2), (B, D))
    want = _loop_reference(CallRngsLayer, x, w, call_rngs=nnx.Rngs(dropout=5))
    rngs = nnx.Rngs(dropout=5)
    model = fully_shard_scan(CallRngsLayer, L, rngs=nnx.Rngs(0), mesh=mesh)
    got = _unit_steps(model, x, w, call_rngs=rngs)
    for (gl, gh, _, _, grngs), (wl, wh, _, _, wrngs) in zip(got, want, strict=True):
        utils.assert_close(gh, wh)
        utils.assert_close(gl, wl)
        _assert_state_equal(grngs, wrngs)
    assert int(rngs.dropout.count[...]) == 2 * L  # each layer drew once per call


class _Static(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.steps = 0

    def __call__(self, x):
        self.steps += 1  # a Python side effect: nothing can bring it back
        return self.lin(x)


class _Reshape(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.stat = nnx.BatchStat(jnp.zeros((D,)))

    def __call__(self, x):
        self.stat.set_value(jnp.zeros((2, D)))
        return self.lin(x)


class _PerShard(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)
        self.stat = nnx.BatchStat(jnp.zeros((D,)))

    def __call__(self, x):
        self.stat[...] = x.mean(0)  # this device's batch shard only
        return self.lin(x)


class _Narrow(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D // 2, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (_Static, ValueError,
         r"FSDPModule\(_Static\).__call__: the forward changes the module's structure: steps "
         r"\(0 -> 1\).*brings back the values of existing Variables only"),
        (_Reshape, ValueError,
         r"FSDPModule\(_Reshape\)\(scan=True\): the forward changes state 'stat' of one "
         r"layer from float32\[8\] to float32\[2, 8\]"),
        (_PerShard, ValueError,
         r"FSDPModule\(_PerShard\): the forward updates state 'stat' from this device's batch "
         r"shard"),
        (_Narrow, TypeError,
         r"FSDPModule\(_Narrow\)\(scan=True\): a layer returned float32\[4, 4\] for an input of "
         r"float32\[4, 8\] \(per device\)"),
    ],
    ids=["python-attribute", "shape-change", "per-shard", "output-shape"],
)  # fmt: skip
def test_updates_a_scan_cannot_carry_are_errors(make, error, match):
    mesh = utils.mesh(1, 2, 1)
    model = fully_shard_scan(make, L, rngs=nnx.Rngs(0), mesh=mesh)
    x = jnp.ones((B, D))
    with pytest.raises(error, match=match):
        nnx.jit(lambda m, x: m(x))(model, x)
