"""The model's own loops and conds run per device as on one device (`shardlax._control_flow`).

Values and gradients of `scan` / `fori_loop` / `while_loop` / `cond` / `switch`
whose carry starts constant (or from a replicated parameter) and meets the
batch shard, per device on a mesh, against plain jnp on the whole batch, and
inside a `fully_shard` unit (the recurrent corpus model, `tests/models/recurrent.py`,
trains under every strategy in `tests/test_trainer_corpus.py` and
`tests/test_trainer_fsdp_units.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import _control_flow
from tests import utils
from tests.models import host

pytestmark = pytest.mark.standard_dtype_promotion

D = 3


def scan_zeros(w, x):  # x [b, T, D]; the carry starts at zeros
    def step(c, xt):
        c = jnp.tanh(c @ w + xt)
        return c, c.sum(-1)

    c, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], D)), jnp.swapaxes(x, 0, 1))
    return c + ys.T.sum(-1, keepdims=True)


def scan_reverse_no_xs(w, x):
    c, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w + x[:, 0]), None), jnp.zeros((x.shape[0], D)),
                        length=3, reverse=True)  # fmt: skip
    return c


def fori_from_param(w, x):  # the carry starts from the (replicated) parameter
    h = jnp.broadcast_to(w[0], (x.shape[0], D))
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w + x[:, i]), h)


def while_counter(w, x):
    def body(c):
        n, h = c
        return n + 1, jnp.tanh(h @ w + x[:, 0])

    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros((x.shape[0], D))))[1]


def cond_zeros_branch(w, x):
    h = x[:, 0] @ w
    zeros = jnp.zeros((x.shape[0], D))
    return jax.lax.cond(jnp.sum(w) > 100.0, lambda: zeros, lambda: h * w[1][None, :])


def switch_constant_branch(w, x):
    h = x[:, 1] @ w
    return jax.lax.switch(1, [lambda: jnp.ones((x.shape[0], D)), lambda: jnp.tanh(h), lambda: h])


#: (fn, differentiable): JAX has no reverse mode for while_loop
CASES = [
    (scan_zeros, True), (scan_reverse_no_xs, True), (fori_from_param, True),
    (while_counter, False), (cond_zeros_branch, True), (switch_constant_branch, True),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "grad"), CASES, ids=lambda f: getattr(f, "__name__", str(f)))
def test_per_device_values_and_gradients_are_the_whole_batch_ones(fn, grad):
    mesh = utils.mesh(data=2, fsdp=2)
    w = jnp.asarray(utils.rand(0, D, D)) * 0.5
    x = jnp.asarray(utils.rand(1, 8, 4, D))

    def body(w, x):
        with _control_flow.varying_carries():
            return fn(w, x)

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(("data", "fsdp"))),
                            out_specs=P(("data", "fsdp")))  # fmt: skip

    def loss(f, w, x):
        return jnp.sum(f(w, x) ** 2)

    w_r = jax.device_put(w, NamedSharding(mesh, P()))
    x_s = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    utils.assert_close(jax.jit(sharded)(w_r, x_s), fn(w, x))
    if grad:
        got, got_dw = jax.jit(jax.value_and_grad(lambda w, x: loss(sharded, w, x)))(w_r, x_s)
        want, want_dw = jax.value_and_grad(lambda w, x: loss(fn, w, x))(w, x)
        utils.assert_close(got, want)
        utils.assert_close(got_dw, want_dw)
    # without the context JAX refuses these per device (the reason for it)
    with pytest.raises(TypeError, match=r"manual axis types do not match|must have equal"):
        jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(("data", "fsdp"))),
                              out_specs=P(("data", "fsdp"))))(w_r, x_s)  # fmt: skip


def test_other_type_errors_are_jax_own_and_the_functions_come_back():
    mesh = utils.mesh(data=2)
    bad = lambda x: jax.lax.scan(lambda c, _: (c[:1], None), x, length=2)[0]

    def body(x):
        with _control_flow.varying_carries(), _control_flow.varying_carries():
            return bad(x)

    with pytest.raises(TypeError, match="must have equal types"):
        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(
            jax.device_put(jnp.ones((4, 3)), NamedSharding(mesh, P("data")))
        )
    assert jax.lax.scan is _control_flow._ORIG["scan"]
    assert jax.lax.cond is _control_flow._ORIG["cond"]


class Looped(nnx.Module):
    """A Linear, then the model's own scan from a zeros carry and a cond with a zeros branch."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):  # x [b, T, D]
        h = scan_zeros(self.lin.kernel[...], self.lin(x))
        return cond_zeros_branch(self.lin.kernel[...], h[:, None, :])


def test_a_unit_runs_the_models_loops_with_the_one_device_gradient():
    """A `fully_shard` unit called in the user's own jit (no Trainer around it)."""
    mesh = utils.mesh(data=2, fsdp=2)
    x = jnp.asarray(utils.rand(2, 8, 4, D))

    def loss(m, x):
        return jnp.sum(m(x) ** 2)

    want_loss, want = nnx.value_and_grad(loss)(Looped(nnx.Rngs(0)), x)
    unit = shardlax.fully_shard(Looped(nnx.Rngs(0)), mesh=mesh)
    got_loss, got = nnx.jit(nnx.value_and_grad(loss))(unit, x)
    utils.assert_close(got_loss, want_loss)
    got_leaves = {jax.tree_util.keystr(p): v for p, v in
                  jax.tree_util.tree_flatten_with_path(host(got))[0]}  # fmt: skip
    for p, v in jax.tree_util.tree_flatten_with_path(host(want))[0]:
        utils.assert_close(got_leaves[jax.tree_util.keystr(p)], v, err_msg=str(p))
