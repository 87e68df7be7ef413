"""`fully_shard` as FSDP2 users write it (issue 9): state, nesting, methods, pytrees, manual mode.

Every reference is the same flax model, unwrapped, on one device (plain nnx).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from tests import utils
from tests.models import counter, rngs_at_call

D, H, V, B = 8, 16, 12, 8


class Net(nnx.Module):
    """Linear -> BatchNorm -> Dropout, with a call counter: every kind of mutable state."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(D, H, rngs=rngs)
        self.bn = nnx.BatchNorm(H, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x, *, train=True):
        self.calls[...] += 1
        h = self.bn(self.lin(x), use_running_average=not train)
        return self.drop(h, deterministic=not train)


def _loss(m, x):
    return jnp.sum(jnp.sin(m(x)))


def _grads(g):
    return jax.tree.leaves(nnx.state(g, nnx.Param))


@pytest.mark.parametrize("mesh_shape", [(1, 4, 1), (2, 2, 1)], ids=str)
def test_batchnorm_dropout_counter_inside_a_unit_equal_one_device(mesh_shape):
    """Global-batch statistics, running averages, bit-identical dropout masks, rng
    counters and a counter Variable, over 2 training steps and one eval call."""
    mesh = utils.mesh(*mesh_shape)
    ref, unit = Net(nnx.Rngs(0)), fully_shard(Net(nnx.Rngs(0)), mesh=mesh)
    x = jax.random.normal(jax.random.key(1), (B, D)) * 2.0 + 1.0
    step = nnx.jit(nnx.value_and_grad(_loss))
    for _ in range(2):
        (loss, g), (loss_ref, g_ref) = step(unit, x), nnx.value_and_grad(_loss)(ref, x)
        utils.assert_close(loss, loss_ref, err_msg="loss")
        for a, b in zip(_grads(g), _grads(g_ref), strict=True):
            utils.assert_close(a, b, err_msg="grad")
    y, y_ref = nnx.jit(lambda m, x: m(x))(unit, x), ref(x)
    np.testing.assert_array_equal(np.asarray(y) == 0, np.asarray(y_ref) == 0)  # same mask
    utils.assert_close(y, y_ref, err_msg="train forward")
    utils.assert_close(unit.bn.mean[...], ref.bn.mean[...], err_msg="running mean")
    utils.assert_close(unit.bn.var[...], ref.bn.var[...], err_msg="running var")
    assert float(np.abs(np.asarray(ref.bn.mean[...])).max()) > 0.01  # they moved
    assert int(unit.calls[...]) == int(ref.calls[...]) == 3
    assert int(unit.drop.rngs.count[...]) == int(ref.drop.rngs.count[...]) == 3
    y = nnx.jit(lambda m, x: m(x, train=False))(unit, x)
    utils.assert_close(y, ref(x, train=False), err_msg="eval forward")


def test_batchnorm_statistics_are_one_declared_all_reduce():
    mesh = utils.mesh(1, 4, 1)
    unit = fully_shard(nnx.BatchNorm(H, rngs=nnx.Rngs(0)), mesh=mesh)
    x = jax.random.normal(jax.random.key(1), (B, H))
    report = audit.collectives(nnx.jit(lambda m, x: m(x, use_running_average=False)), unit, x)
    # forward: mean and mean of squares stacked, [2, 16] f32, in one all-reduce; the
    # (16,) scale and bias are split over fsdp=4 and gathered
    assert [(c.kind, c.operand_bytes) for c in report.where("all-reduce")] == [("all-reduce", 128)]
    assert len(report.where("all-gather")) == 2


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class LM(nnx.Module):
    """Embed -> blocks -> LayerNorm -> tied head through `attend`."""

    def __init__(self, rngs, wrap_blocks=None):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        if wrap_blocks is not None:
            self.blocks = nnx.List([wrap_blocks(b) for b in self.blocks])
        self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.embed.attend(self.norm(h))


def _ids():
    return jax.random.randint(jax.random.key(1), (B, 5), 0, V)


def _compare_lm(model, ref, ids):
    y = nnx.jit(lambda m, x: m(x))(model, ids)
    host = np.asarray(ids)  # the reference runs on one device
    utils.assert_close(y, ref(host), err_msg="forward")
    g = nnx.jit(nnx.grad(_loss))(model, ids)
    g_ref = nnx.grad(_loss)(ref, host)
    for a, b in zip(_grads(g), _grads(g_ref), strict=True):
        utils.assert_close(a, b, err_msg="grad")


def test_nested_units_blocks_then_root():
    mesh = utils.mesh(2, 2, 1)
    root = fully_shard(LM(nnx.Rngs(0), lambda b: fully_shard(b, mesh=mesh)), mesh=mesh)
    # the root gathers only what the blocks do not own: embed and norm
    own = {p for p, o in zip(root.param_paths(), root.fsdp_config.owned, strict=True) if o}
    assert own == {"embed.embedding", "norm.bias", "norm.scale"}
    _compare_lm(root, LM(nnx.Rngs(0)), _ids())


def test_plain_embed_and_head_outside_per_block_units_auto_mesh():
    """The FSDP2 pattern: blocks wrapped, plain nnx.Embed and head outside, the whole
    model under jit on a batch-sharded input (Auto mesh: plain flax code unchanged)."""
    mesh = utils.mesh(1, 4, 1, axis_types="auto")
    model = LM(nnx.Rngs(0), lambda b: fully_shard(b, mesh=mesh))
    ids = jax.device_put(_ids(), NamedSharding(mesh, P("fsdp")))
    _compare_lm(model, LM(nnx.Rngs(0)), ids)


def test_fsdp2_pattern_on_the_default_explicit_mesh():
    """On an Explicit mesh a plain nnx.Embed lookup on batch-sharded ids has no
    sharding rule (ShardingTypeError, a JAX limitation); wrapping the embedding
    too (lookup and tied head through `attend` run inside its shard_map) works."""
    mesh = utils.mesh(1, 4, 1)
    model = LM(nnx.Rngs(0), lambda b: fully_shard(b, mesh=mesh))
    ids = jax.device_put(_ids(), NamedSharding(mesh, P("fsdp")))
    with pytest.raises(Exception, match=r"out sharding could not be resolved unambiguously"):
        nnx.jit(lambda m, x: m(x))(model, ids)
    model.embed = fully_shard(model.embed, mesh=mesh)
    _compare_lm(model, LM(nnx.Rngs(0)), ids)


def test_forward_methods_and_pytrees():
    mesh = utils.mesh(1, 4, 1)
    ref, unit = (
        nnx.Embed(V, D, rngs=nnx.Rngs(3)),
        fully_shard(nnx.Embed(V, D, rngs=nnx.Rngs(3)), mesh=mesh),
    )
    h = jax.random.normal(jax.random.key(2), (B, D))
    y = nnx.jit(lambda e, h: e.attend(h))(unit, h)
    utils.assert_close(y, ref.attend(h), err_msg="attend")

    class Aux(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)
            self.drop = nnx.Dropout(0.25)

        def __call__(self, x, scale, *, rngs, flip=False):
            y = self.drop(self.lin(x) * scale, rngs=rngs)
            return {"y": -y if flip else y, "n": jnp.float32(2.0), "none": None}

        def _double(self, x):
            return 2 * self.lin(x)

    ref, unit = Aux(nnx.Rngs(0)), fully_shard(Aux(nnx.Rngs(0)), mesh=mesh)
    scale = jnp.arange(D, dtype=jnp.float32)[None]  # [1, D], not per example: replicated
    r_ref, r = nnx.Rngs(dropout=5), nnx.Rngs(dropout=5)
    out = nnx.jit(lambda m, x, s, r: m(x, s, rngs=r, flip=True))(unit, h, scale, r)
    want = ref(h, scale, rngs=r_ref, flip=True)
    utils.assert_close(out["y"], want["y"], err_msg="y")
    np.testing.assert_array_equal(np.asarray(out["y"]) == 0, np.asarray(want["y"]) == 0)
    assert float(out["n"]) == 2.0 and out["none"] is None
    assert int(r.dropout.count[...]) == int(r_ref.dropout.count[...]) == 1

    # the unit is the module itself (FSDP2's in-place class change): its attributes are its
    # own (a submodule, an nnx.Rngs: callable, yet no forward method), and so are its paths
    plain = rngs_at_call.make(0)
    cls, l1, rngs = type(plain), plain.l1, plain.rngs
    owned = fully_shard(plain, mesh=mesh)
    assert owned is plain and owned.l1 is l1 and owned.rngs is rngs
    assert isinstance(owned.rngs, nnx.Rngs) and isinstance(owned, cls)
    assert type(owned).__name__ == f"FSDP{cls.__name__}" and isinstance(owned, FSDPModule)
    x = jax.random.normal(jax.random.key(4), (B, rngs_at_call.IN))
    ref_owned = rngs_at_call.make(0)
    got = nnx.jit(lambda m, x: m(x, rngs=m.rngs))(owned, x)
    utils.assert_close(got, ref_owned(x, rngs=ref_owned.rngs))
    assert int(owned.rngs.dropout.count[...]) == int(ref_owned.rngs.dropout.count[...]) == 1

    with pytest.raises(AttributeError):
        unit._double(h)  # private methods are not forward methods until registered
    register_fsdp_forward_method(unit, "_double")
    utils.assert_close(nnx.jit(lambda m, x: m._double(x))(unit, h), ref._double(h))


def test_manual_mode_inside_an_enclosing_shard_map():
    """The Trainer's one-shard_map step: the unit runs its body on local shards."""
    mesh = utils.mesh(2, 2, 2)
    ref, unit = Block(nnx.Rngs(0)), fully_shard(Block(nnx.Rngs(0)), mesh=mesh)
    graphdef, params = nnx.split(unit, nnx.Param)
    _, p_tree = jax.tree.flatten(params)
    p_specs = jax.tree.unflatten(p_tree, list(unit.fsdp_config.param_specs))
    batch = P(("data", "fsdp"))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (B, D)), NamedSharding(mesh, batch))

    def forward(params, x):
        def body(params, x):
            return nnx.merge(graphdef, params)(x)

        return jax.shard_map(body, mesh=mesh, in_specs=(p_specs, batch), out_specs=batch)(params, x)

    def loss(params, x):
        return jnp.sum(jnp.sin(forward(params, x)))

    with jax.set_mesh(mesh):
        y = jax.jit(forward)(params, x)
        g = jax.jit(jax.grad(loss))(params, x)
    x_host = np.asarray(x)
    utils.assert_close(y, ref(x_host), err_msg="forward")
    g_ref = nnx.grad(_loss)(ref, x_host)
    for a, b in zip(jax.tree.leaves(g), _grads(g_ref), strict=True):
        utils.assert_close(a, b, err_msg="grad")


def test_error_state_updated_from_the_batch_shard():
    class Sum(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(D, D, rngs=nnx.Rngs(0))
            self.total = nnx.Variable(jnp.zeros(()))

        def __call__(self, x):
            self.total[...] += jnp.sum(x)
            return self.lin(x)

    unit = fully_shard(Sum(), mesh=utils.mesh(1, 4, 1))
    with pytest.raises(
        ValueError,
        match=r"FSDPModule\(Sum\): the forward updates state 'total' from this device's batch "
        r"shard \(it varies over mesh axes \['fsdp'\]\); one device would compute it from the "
        r"whole batch",
    ):
        nnx.jit(lambda m, x: m(x))(unit, jnp.ones((B, D)))


@pytest.mark.standard_dtype_promotion  # optax's Adam mixes Python floats and int32 counts
def test_state_mean_over_the_batch_in_a_unit_is_declared():
    """fully_shard(state_reduction='mean'): a running mean of activations, as one device;
    its all-reduce is in the Trainer's declaration and in the compiled step."""
    mesh = utils.mesh(1, 4, 1)
    unit = fully_shard(counter.make(0), mesh=mesh, state_reduction="mean")
    trainer = shardlax.Trainer(unit, optax.adam(1e-2), counter.loss_fn, mesh=mesh)
    batch = counter.make_batch(jax.random.key(0), 8)
    state, _ = trainer.step(trainer.init(), batch)
    ref = counter.make(0)
    nnx.jit(lambda m, b: counter.loss_fn(m, b))(ref, batch)
    got = trainer.model(state).hidden_mean[...]
    utils.assert_close(got, ref.hidden_mean[...])
    report = audit.collectives(trainer.step, state, batch)
    declared = trainer.declared_collectives(
        batch, model_collectives=unit.declared_collectives(batch["x"], input_grad=False)
    )
    cmp = audit.compare(declared, report)
    assert cmp.ok, cmp.table()
    assert any(d.bytes == counter.HIDDEN * 4 for d in declared if d.kind == "all-reduce")
    with pytest.raises(ValueError, match=r"state_reduction='median'\): expected None"):
        fully_shard(counter.make(0), mesh=mesh, state_reduction="median")
    plain = fully_shard(counter.make(0), mesh=mesh)
    with pytest.raises(ValueError, match=r"Pass fully_shard\(\.\.\., state_reduction='mean'\)"):
        nnx.jit(lambda m, x: m(x))(plain, batch["x"])


def test_error_output_reduced_over_the_batch_shard():
    class Mean(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(D, D, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.mean(self.lin(x))

    unit = fully_shard(Mean(), mesh=utils.mesh(1, 4, 1))
    with pytest.raises(
        ValueError,
        match=r"FSDPModule\(Mean\).__call__: an output of per-device shape \(\) depends on this "
        r"device's batch shard but is not per example .* Return per-example values",
    ):
        nnx.jit(lambda m, x: m(x))(unit, jnp.ones((B, D)))


def test_error_nested_units_on_different_meshes_and_bad_registration():
    inner = fully_shard(Block(nnx.Rngs(0)), mesh=utils.mesh(1, 2, 1))
    with pytest.raises(ValueError, match=r"Nested fully_shard calls must use the same mesh"):
        fully_shard(nnx.List([inner]), mesh=utils.mesh(1, 4, 1))
    with pytest.raises(ValueError, match=r"register_fsdp_forward_method\(name='nope'\): Block"):
        register_fsdp_forward_method(inner, "nope")
    with pytest.raises(TypeError, match=r"expected the FSDPModule that fully_shard returned"):
        register_fsdp_forward_method(Block(nnx.Rngs(0)), "__call__")
    assert isinstance(inner, FSDPModule)


def test_error_python_output():
    class Shape(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(D, D, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.lin(x), x.shape[0]  # the per-device batch, not the global one

    unit = fully_shard(Shape(), mesh=utils.mesh(1, 4, 1))
    with pytest.raises(
        TypeError,
        match=r"FSDPModule\(Shape\).__call__: output 1 is a int, not an array; inside the unit "
        r"it is computed per device",
    ):
        nnx.jit(lambda m, x: m(x))(unit, jnp.ones((B, D)))


@pytest.mark.parametrize("nested", [False, True], ids=["block", "nested"])
def test_declared_collectives_derived_from_example_inputs(nested):
    """No hand-written `regathered=`: the unit traces its gradient and counts the
    all-gathers left after dead-code removal; equal to the compiled program."""
    mesh = utils.mesh(2, 2, 1)
    if nested:
        unit = fully_shard(LM(nnx.Rngs(0), lambda b: fully_shard(b, mesh=mesh)), mesh=mesh)
        x = _ids()
    else:
        unit = fully_shard(Block(nnx.Rngs(0)), mesh=mesh)
        x = jax.random.normal(jax.random.key(1), (B, D))
    fn = nnx.jit(nnx.value_and_grad(_loss))  # no gradient of x: input_grad=False
    report = audit.collectives(fn, unit, x, mesh=mesh)
    declared = unit.declared_collectives(x, input_grad=False)
    declared.append(audit.Declared("all-reduce", ("data", "fsdp"), "f32", 1, 4, "loss"))
    comparison = audit.compare(declared, report)
    assert comparison.ok, comparison.table()
    regathers = sum(d.count - 1 for d in declared if d.kind == "all-gather")
    assert regathers >= 1  # a kernel feeding a later layer's gradient is gathered again
    if not nested:  # with the input's gradient, the first kernel is gathered again too
        fn_dx = nnx.jit(nnx.value_and_grad(_loss, argnums=(0, 1)))
        with_dx = unit.declared_collectives(x)
        with_dx.append(audit.Declared("all-reduce", ("data", "fsdp"), "f32", 1, 4, "loss"))
        cmp = audit.compare(with_dx, audit.collectives(fn_dx, unit, x, mesh=mesh))
        assert cmp.ok, cmp.table()
        assert sum(d.count - 1 for d in with_dx if d.kind == "all-gather") == regathers + 1
