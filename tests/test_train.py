"""shardlax.train: dp / zero1 / zero2 training equals single-device optax training.

References are plain optax + `jax.grad` on one device and the whole batch;
they share nothing with the code under test but the model definition.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, train
from tests import utils

pytestmark = pytest.mark.standard_dtype_promotion

STRATEGIES = ("dp", "zero1", "zero2")
DATA_SIZES = (1, 2, 4, 8)
MAX_NORM = 0.1  # below every step's gradient norm on this problem (asserted)


class MLP(nnx.Module):
    """6 -> 10 -> 3: no size divisible by 4 or 8, so ZeRO pads every parameter."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(6, 10, rngs=rngs)
        self.l2 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def make_batch(size: int, seed: int = 1):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(kx, (size, 6)), "y": jax.random.normal(ky, (size, 3))}


def adamw_clipped():
    return utils.adamw_clipped(MAX_NORM)


@functools.cache
def reference_training(n_steps: int, batch_size: int):
    """Plain optax on one device (adamw + clip): final params, losses, gradient norms."""
    tx = adamw_clipped()
    batches = [make_batch(batch_size, seed) for seed in range(n_steps)]
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    losses, norms = [], []
    for batch in batches:
        params, opt_state, loss, norm = step(params, opt_state, batch)
        losses.append(float(loss))
        norms.append(float(norm))
    return params, losses, norms


def reference_grads(batch):
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))
    return params, jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)


def assert_params_close(actual, expected, what: str):
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        utils.assert_close(a, b, jnp.float32, f"{what}: {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("n", DATA_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_training_matches_single_device(strategy, n):
    """5 steps of adamw + an active clip_by_global_norm, on 1, 2, 4 and 8 devices."""
    mesh = utils.mesh(data=n)
    batches = [make_batch(16, seed) for seed in range(5)]
    ref_params, ref_losses, ref_norms = reference_training(5, 16)
    assert min(ref_norms) > MAX_NORM, f"clipping is not active: norms {ref_norms}"

    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy=strategy)  # fmt: skip
    state = trainer.init()
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, **utils.tolerance(jnp.float32))
    assert_params_close(state.params, ref_params, f"{strategy} on {n} devices")
    assert int(state.step) == 5
    for leaf in jax.tree.leaves(state.params):
        utils.assert_sharding(leaf, mesh, jax.sharding.PartitionSpec())


@pytest.mark.parametrize("n", DATA_SIZES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_ratio_is_one(strategy, n):
    """One sgd(1) step moves the parameters by exactly the mean gradient (never N times it)."""
    mesh = utils.mesh(data=n)
    batch = make_batch(16)
    params0, ref = reference_grads(batch)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(1.0), loss_fn, mesh=mesh,
                            strategy=strategy)  # fmt: skip
    state, _ = trainer.step(trainer.init(), batch)
    step = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params0, state.params)
    num = sum(
        float(np.vdot(s, g))
        for s, g in zip(jax.tree.leaves(step), jax.tree.leaves(ref), strict=True)
    )
    den = sum(float(np.vdot(g, g)) for g in jax.tree.leaves(ref))
    assert abs(num / den - 1.0) < 1e-5, f"gradient ratio {num / den}"
    assert_params_close(step, ref, "gradient")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_accumulation_reduces_once(strategy):
    """4 micro-batches per device: same training as the whole batch, one reduction per step."""
    mesh = utils.mesh(data=4)
    batches = [make_batch(32, seed) for seed in range(2)]
    ref_params, _, _ = reference_training(2, 32)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy=strategy, accum_steps=4)  # fmt: skip
    state = trainer.init()
    report = audit.collectives(trainer.step, state, batches[0])
    cmp = audit.compare(trainer.declared_collectives(batches[0]), report)
    assert cmp.ok, cmp.table()
    assert not [c for c in report if c.in_loop], report.table()
    big = [c for c in report if c.bytes > 8]  # gradient and parameter buckets
    assert len(big) == (1 if strategy == "dp" else 2), report.table()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    assert_params_close(state.params, ref_params, f"{strategy}, accum_steps=4")


def _declared_table(strategy, n, bucket_bytes):
    mesh = utils.mesh(data=n)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy=strategy, bucket_bytes=bucket_bytes)  # fmt: skip
    batch = make_batch(16)
    state = trainer.init()
    report = audit.collectives(trainer.step, state, batch)
    declared = trainer.declared_collectives(batch)
    norms = [d for d in declared if d.why == "global norm"]
    assert len(norms) == (0 if strategy == "dp" else 1)  # dp clips replicated gradients
    return trainer, report, audit.compare(declared, report)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_step_compiles_to_declared_collectives(strategy):
    """8 devices, buckets of at most 128 bytes: exactly the declared kinds, axes, dtypes, bytes."""
    trainer, report, cmp = _declared_table(strategy, 8, 128)
    assert cmp.ok, cmp.table()
    assert len(trainer.buckets) == 4  # W1 (64 padded floats) ; b1 ; W2 ; b2 each > half of 128 B
    assert {c.axes for c in report} == {("data",)}
    assert {c.dtype for c in report} == {"f32"}
    kinds = report.kinds()
    grad_bytes = sum(b.padded_bytes for b in trainer.buckets)
    if strategy == "zero2":
        # stage 2: every gradient byte reduce-scattered once, every parameter byte
        # all-gathered once, and only scalars all-reduced.
        assert sum(c.bytes for c in report.where("reduce-scatter")) == grad_bytes
        assert sum(c.bytes for c in report.where("all-gather")) == grad_bytes
        assert all(c.bytes <= 8 for c in report.where("all-reduce")), report.table()
    if strategy == "zero1":
        assert "reduce-scatter" not in kinds
        assert sum(c.bytes for c in report.where("all-gather")) == grad_bytes
    if strategy == "dp":
        assert set(kinds) == {"all-reduce"}
        assert report.total_bytes() == 412 + 4  # parameters (103 floats) + the loss


def test_missing_cast_to_varying_is_caught():
    """Without casting the replicated params to varying, JAX all-reduces the gradients first."""
    mesh = utils.mesh(data=4)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2", _cast_params=False)  # fmt: skip
    batch = make_batch(16)
    report = audit.collectives(trainer.step, trainer.init(), batch)
    cmp = audit.compare(trainer.declared_collectives(batch), report)
    assert not cmp.ok
    assert sum(c.bytes for c in report.where("all-reduce")) >= 412, report.table()


def test_optax_clip_needs_the_global_norm():
    """optax.clip_by_global_norm on shards, without the hook, clips by a local norm (wrong);
    with the hook, or with shardlax.zero.clip_by_global_norm, it matches single-device."""
    mesh = utils.mesh(data=8)
    batches = [make_batch(16, seed) for seed in range(2)]
    ref_params, _, _ = reference_training(2, 16)

    def run(tx, hook):
        trainer = train.Trainer(MLP(nnx.Rngs(0)), tx, loss_fn, mesh=mesh, strategy="zero2",
                                optax_norm_hook=hook)  # fmt: skip
        state = trainer.init()
        for batch in batches:
            state, _ = trainer.step(state, batch)
        return state.params

    # without the hook optax's norm would be the local one: refused when the Trainer is built
    with pytest.raises(ValueError, match=r"clip_by_global_norm|global norm|norm"):
        run(adamw_clipped(), hook=False)
    own = optax.chain(
        shardlax.zero.clip_by_global_norm(MAX_NORM), optax.adamw(1e-2, weight_decay=0.1)
    )
    assert_params_close(run(own, hook=False), ref_params, "shardlax.zero.clip_by_global_norm")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_bytes_per_device(strategy):
    """Optimizer state on each device is total/N (+ padding) under ZeRO, total under dp."""
    n = 8
    mesh = utils.mesh(data=n)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), optax.adamw(1e-2), loss_fn, mesh=mesh,
                            strategy=strategy)  # fmt: skip
    state, _ = trainer.step(trainer.init(), make_batch(16))
    n_params = 6 * 10 + 10 + 10 * 3 + 3
    padded = sum(n * -(-s // n) for s in (60, 10, 30, 3))  # 64 + 16 + 32 + 8
    for leaf in jax.tree.leaves(state.params):
        assert {s.data.nbytes for s in leaf.addressable_shards} == {leaf.nbytes}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert len(moments) == 2 * 4  # mu and nu of 4 parameters
    per_device = {
        d: sum(s.data.nbytes for x in moments for s in x.addressable_shards if s.device == d)
        for d in mesh.devices.flat
    }
    if strategy == "dp":
        assert set(per_device.values()) == {2 * n_params * 4}
    else:
        assert set(per_device.values()) == {2 * padded * 4 // n}  # 2 moments x 15 floats
        assert 2 * padded * 4 // n <= 2 * (n_params * 4 // n + 4 * 4)  # +1 float per param
    assert trainer.state_bytes()["opt_state"] == max(per_device.values()) + 4  # + the count


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_abstract_state_is_init_without_memory(strategy):
    """abstract_state(): init()'s shapes, dtypes and shardings; compiles the step; of an
    abstract (nnx.eval_shape) model too."""
    mesh = utils.mesh(data=4)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy=strategy)  # fmt: skip
    state = trainer.init()
    abstract = trainer.abstract_state()
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(16))
    trainer.step.lower(abstract, batch).compile()
    lazy = train.Trainer(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))), adamw_clipped(), loss_fn,
                         mesh=mesh, strategy=strategy)  # fmt: skip
    assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), lazy.abstract_state()) == (
        jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract)
    )


def test_donation_reuses_the_old_state():
    """The old state is donated (its buffers deleted) and no 'not usable' warning is raised."""
    mesh = utils.mesh(data=2)
    model = MLP(nnx.Rngs(0))
    state, step = train.make_train_step(model, adamw_clipped(), loss_fn, mesh=mesh,
                                        strategy="zero2")  # fmt: skip
    old = jax.tree.leaves(state)
    state, metrics = step(state, make_batch(16))  # warnings are errors (pyproject)
    assert all(x.is_deleted() for x in old)
    assert np.isfinite(float(metrics["loss"]))


def test_trained_model_is_an_nnx_module():
    mesh = utils.mesh(data=2)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh, strategy="dp")
    state, _ = trainer.step(trainer.init(), make_batch(16))
    model = trainer.model(state)
    assert isinstance(model, MLP)
    x = make_batch(4)["x"]
    expected = jnp.tanh(
        x @ state.params["l1"]["kernel"][...] + state.params["l1"]["bias"][...][None]
    )
    utils.assert_close(jnp.tanh(model.l1(x)), expected)


# ------------------------------------------------------------------ bad input
def test_unknown_strategy():
    mesh = utils.mesh(data=2)
    with pytest.raises(
        ValueError, match=r"strategy='zero3'.*Choose one of \('dp', 'zero1', 'zero2'"
    ):
        train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh, strategy="zero3")


def test_data_axis_missing():
    utils.need_devices(2)
    mesh = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    with pytest.raises(ValueError, match=r"data_axis='data'.*not in the mesh.*\('batch',\)"):
        train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh)


def test_accum_steps_not_dividing_the_batch():
    mesh = utils.mesh(data=4)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh, accum_steps=3)
    with pytest.raises(
        ValueError,
        match=r"accum_steps=3.*per-device batch of 4 \(global batch 16 over mesh axes "
        r"\('data',\) of size 4\).*3 does not divide 4.*divisible by 12",
    ):
        trainer.step(trainer.init(), make_batch(16))


def test_batch_not_divisible_by_data_axis():
    mesh = utils.mesh(data=4)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh)
    with pytest.raises(
        ValueError, match=r"batch of 6 cannot be split.*\(size 4\): 4 does not divide 6"
    ):
        trainer.step(trainer.init(), make_batch(6))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(accum_steps=0), ValueError, r"accum_steps=0.*positive int"),
        (dict(bucket_bytes=0), ValueError, r"bucket_bytes=0.*positive int"),
        (dict(tx="adam"), TypeError, r"tx='adam'.*optax.GradientTransformation"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    mesh = utils.mesh(data=2)
    args = dict(tx=optax.sgd(0.1)) | kwargs
    tx = args.pop("tx")
    with pytest.raises(error, match=match):
        train.Trainer(MLP(nnx.Rngs(0)), tx, loss_fn, mesh=mesh, **args)


class ScannedMLP(nnx.Module):
    """4 residual tanh layers stacked on a leading axis, run with lax.scan under remat."""

    def __init__(self, rngs: nnx.Rngs, depth: int = 4, width: int = 6):
        init = nnx.initializers.lecun_normal()
        self.w = nnx.Param(init(rngs.params(), (depth, width, width)))
        self.b = nnx.Param(jnp.zeros((depth, width)))
        self.out = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, x):
        @jax.checkpoint
        def layer(h, wb):
            w, b = wb
            return h + jnp.tanh(h @ w + b[None]), None

        h, _ = jax.lax.scan(layer, x, (self.w[...], self.b[...]))
        return self.out(h)


def test_scanned_model_zero2():
    """Stacked [L, D, D] parameters under lax.scan + remat train as on one device."""
    mesh = utils.mesh(data=4)
    batches = [make_batch(16, seed) for seed in range(3)]
    tx = adamw_clipped()
    graphdef, params = nnx.split(ScannedMLP(nnx.Rngs(0)))
    opt = tx.init(params)

    @jax.jit
    def ref_step(params, opt, batch):
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for batch in batches:
        params, opt = ref_step(params, opt, batch)
    trainer = train.Trainer(ScannedMLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2")  # fmt: skip
    state = trainer.init()
    for batch in batches:
        state, _ = trainer.step(state, batch)
    assert_params_close(state.params, params, "scanned zero2")
    report = audit.collectives(trainer.step, state, batches[0])
    assert audit.compare(trainer.declared_collectives(batches[0]), report).ok
    assert not [c for c in report if c.in_loop], report.table()  # no collective per layer


@pytest.mark.parametrize(
    ("mesh_kwargs", "trainer_kwargs"),
    [
        (dict(data=2, fsdp=2), dict(data_axis=("data", "fsdp"))),  # ZeRO over two axes
        (dict(data=4, axis_types="auto"), {}),  # an Auto (GSPMD) mesh
    ],
    ids=["two-data-axes", "auto-mesh"],
)
def test_zero2_other_meshes(mesh_kwargs, trainer_kwargs):
    mesh = utils.mesh(**mesh_kwargs)
    ref_params, _, _ = reference_training(5, 16)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2", **trainer_kwargs)  # fmt: skip
    state = trainer.init()
    for seed in range(5):
        state, _ = trainer.step(state, make_batch(16, seed))
    assert_params_close(state.params, ref_params, str(mesh_kwargs))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert {s.data.size for s in moments[0].addressable_shards} == {moments[0].size // 4}


class WithBatchStats(nnx.Module):
    """Non-parameter state (BatchNorm statistics) rides along, read-only and donated."""

    def __init__(self, rngs: nnx.Rngs):
        self.mlp = MLP(rngs)
        self.norm = nnx.BatchNorm(3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.mlp(x))


def test_non_parameter_state_is_passed_through():
    mesh = utils.mesh(data=4)
    model = WithBatchStats(nnx.Rngs(0))
    model.norm.mean[...] = jnp.full((3,), 0.5)
    trainer = train.Trainer(model, optax.sgd(1.0), loss_fn, mesh=mesh, strategy="zero2")
    batch = make_batch(16)
    state, _ = trainer.step(trainer.init(), batch)
    graphdef, params, rest = nnx.split(WithBatchStats(nnx.Rngs(0)), nnx.Param, ...)
    rest["norm"]["mean"][...] = jnp.full((3,), 0.5)
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
    expected = jax.tree.map(lambda p, g: p - g, params, grads)
    assert_params_close(state.params, expected, "with batch stats")
    np.testing.assert_array_equal(np.asarray(state.rest["norm"]["mean"][...]), np.full(3, 0.5))


class Net(nnx.Module):
    def __init__(self, sizes, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


@pytest.mark.slow  # hypothesis over shapes x buckets x strategies: ~40 s
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    bucket_bytes=st.sampled_from([None, 16, 64, 256]),
    strategy=st.sampled_from(STRATEGIES),
    n=st.sampled_from([2, 4, 8]),
)
def test_random_shapes_and_buckets(sizes, bucket_bytes, strategy, n):
    """Any widths (padding everywhere) and bucket sizes: one sgd step moves by the gradient."""
    mesh = utils.mesh(data=n)
    kx, ky = jax.random.split(jax.random.key(len(sizes)))
    batch = {"x": jax.random.normal(kx, (8, sizes[0])), "y": jax.random.normal(ky, (8, sizes[-1]))}
    graphdef, params = nnx.split(Net(sizes, nnx.Rngs(0)))
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
    trainer = train.Trainer(Net(sizes, nnx.Rngs(0)), optax.sgd(1.0), loss_fn, mesh=mesh,
                            strategy=strategy, bucket_bytes=bucket_bytes)  # fmt: skip
    state, _ = trainer.step(trainer.init(), batch)
    expected = jax.tree.map(lambda p, g: p - g, params, grads)
    assert_params_close(state.params, expected, f"{strategy} {sizes} {bucket_bytes}")
    report = audit.collectives(trainer.step, state, batch)
    assert audit.compare(trainer.declared_collectives(batch), report).ok


def test_place_batch_lays_the_batch_out_as_the_step_reads_it():
    mesh = utils.mesh(data=2, fsdp=2)
    trainer = train.Trainer(MLP(nnx.Rngs(0)), adamw_clipped(), loss_fn, mesh=mesh,
                            strategy="zero2")  # fmt: skip
    batch = make_batch(16)
    placed = trainer.place_batch(batch)
    for x in jax.tree.leaves(placed):
        assert x.sharding == NamedSharding(mesh, P(("data", "fsdp")))
    _, host = trainer.step(trainer.init(), batch)
    _, on_mesh = trainer.step(trainer.init(), placed)
    assert float(host["loss"]) == float(on_mesh["loss"])
    with pytest.raises(ValueError, match=r"batch of 6 cannot be split.*\(size 4\)"):
        trainer.place_batch(make_batch(6))
