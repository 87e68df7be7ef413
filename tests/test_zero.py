"""kernels/_zero and shardlax.zero: buckets, sharded reductions and norms against numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardlax import audit, kernels, zero
from tests import utils

SHAPES = [(5, 3), (7,), (), (2, 2, 3)]


def _padded_flat(x: np.ndarray, n: int) -> np.ndarray:
    """numpy reference of the layout: flat, zero-padded to a multiple of n."""
    s = -(-x.size // n)
    return np.concatenate([x.ravel(), np.zeros(n * s - x.size, x.dtype)])


@given(
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    n=st.integers(1, 8),
)
def test_pack_unpack_roundtrip(shapes, n):
    rng = np.random.default_rng(0)
    leaves = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    bucket = kernels.pack_bucket([jnp.asarray(x) for x in leaves], n)
    rows = sum(-(-math.prod(s) // n) for s in shapes)
    assert bucket.shape == (n, rows)
    # row i holds device i's shard of every parameter, in order
    expected = np.concatenate([_padded_flat(x, n).reshape(n, -1) for x in leaves], axis=1)
    np.testing.assert_array_equal(np.asarray(bucket), expected)
    for a, b in zip(kernels.unpack_bucket(bucket, shapes, n), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def _per_device_grads(n: int, seed: int = 0):
    """Different gradients on each device: global [n, *shape], split over 'data'."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, *s)).astype(np.float32) for s in SHAPES]


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_bucket_reduction_keeps_this_devices_shard_of_the_sum(stage):
    n = 4
    mesh = utils.mesh(data=n)
    per_device = _per_device_grads(n)
    kernel = {
        "zero1": kernels.all_reduce_then_shard_bucket,
        "zero2": kernels.reduce_scatter_bucket,
    }[stage]

    def body(*gs):
        return tuple(kernel([g[0] for g in gs], "data"))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    args = [jax.device_put(g, NamedSharding(mesh, P("data"))) for g in per_device]
    out = fn(*args)
    for got, g in zip(out, per_device, strict=True):
        np.testing.assert_allclose(
            np.asarray(got), _padded_flat(g.sum(0), n), **utils.tolerance(jnp.float32)
        )
    kinds = audit.collectives(fn, *args).kinds()
    want = {"zero1": "all-reduce", "zero2": "reduce-scatter"}[stage]
    assert kinds == {want: 1}, kinds  # one collective for the whole bucket


def test_all_reduce_bucket_is_the_sum():
    n = 4
    mesh = utils.mesh(data=n)
    per_device = _per_device_grads(n, seed=1)

    def body(*gs):
        return tuple(kernels.all_reduce_bucket([g[0] for g in gs], "data"))

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P()))
    args = [jax.device_put(g, NamedSharding(mesh, P("data"))) for g in per_device]
    for got, g in zip(fn(*args), per_device, strict=True):
        np.testing.assert_allclose(np.asarray(got), g.sum(0), **utils.tolerance(jnp.float32))
    assert audit.collectives(fn, *args).counts() == {("all-reduce", ("data",), "f32"): 1}


def test_all_gather_bucket_rebuilds_parameters_and_its_gradient():
    """Forward: the shards become the full parameters. Backward: a reduce-scatter, ratio 1."""
    n = 4
    mesh = utils.mesh(data=n)
    rng = np.random.default_rng(2)
    full = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    cot = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    flat = [jax.device_put(_padded_flat(x, n), NamedSharding(mesh, P("data"))) for x in full]

    def body(*shards):
        return tuple(kernels.all_gather_bucket(shards, SHAPES, "data"))

    gather = jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P())
    for got, x in zip(jax.jit(gather)(*flat), full, strict=True):
        np.testing.assert_array_equal(np.asarray(got), x)

    def loss(*shards):
        return sum(jnp.sum(y * c) for y, c in zip(gather(*shards), cot, strict=True))

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(flat)))))(*flat)
    for g, c in zip(grads, cot, strict=True):
        np.testing.assert_allclose(
            np.asarray(g), _padded_flat(c, n), **utils.tolerance(jnp.float32)
        )


def test_local_shard_is_this_devices_row():
    n = 8
    mesh = utils.mesh(data=n)
    x = np.arange(21, dtype=np.float32).reshape(3, 7)
    fn = jax.shard_map(
        lambda x: kernels.local_shard(x, "data"), mesh=mesh, in_specs=P(), out_specs=P("data")
    )
    got = jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P())))
    np.testing.assert_array_equal(np.asarray(got), _padded_flat(x, n))


@pytest.mark.parametrize("ord_", [None, 1, "inf"])
def test_sharded_tree_norm_counts_replicas_once(ord_):
    """Leaves split over (data, model), data, model, or nothing: the norm of the full arrays."""
    mesh = utils.mesh(data=2, model=2)
    rng = np.random.default_rng(3)
    full = {
        "both": rng.standard_normal((4, 6)).astype(np.float32),
        "data": rng.standard_normal((4,)).astype(np.float32),
        "model": rng.standard_normal((2, 4)).astype(np.float32),
        "replicated": 10 * rng.standard_normal((3,)).astype(np.float32),
    }
    specs = {"both": P("data", "model"), "data": P("data"), "model": P(None, "model"),
             "replicated": P()}  # fmt: skip
    args = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in full.items()}
    fn = jax.jit(
        jax.shard_map(
            lambda t: kernels.sharded_tree_norm(t, ord=ord_),
            mesh=mesh,
            in_specs=(specs,),
            out_specs=P(),
        )
    )
    every = np.concatenate([v.ravel() for v in full.values()])
    want = {None: np.linalg.norm(every), 1: np.abs(every).sum(), "inf": np.abs(every).max()}
    np.testing.assert_allclose(float(fn(args)), want[ord_], **utils.tolerance(jnp.float32))
    # one scalar reduction per sharding group: (data, model), (data,), (model,)
    assert sum(c.operands for c in audit.collectives(fn, args)) == 3


def test_sharded_tree_norm_outside_shard_map_is_the_plain_norm():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": -jnp.ones(4)}
    with jax.numpy_dtype_promotion("standard"):
        assert float(kernels.sharded_tree_norm(tree)) == float(optax.tree.norm(tree))
        assert float(kernels.sharded_tree_norm(tree, squared=True)) == 59.0
    with pytest.raises(ValueError, match=r"ord=3.*expected None, 1, 2 or 'inf'"):
        kernels.sharded_tree_norm(tree, ord=3)


def test_plan_buckets():
    f32, bf16 = jnp.float32, jnp.bfloat16
    leaves = [jax.ShapeDtypeStruct(s, d) for s, d in
              [((10,), f32), ((3,), bf16), ((20,), f32), ((100,), f32), ((5,), bf16)]]  # fmt: skip
    # 4 devices: padded f32 bytes 48, 80, 400; bf16 8 (3 -> 4 elements), 16
    one = zero.plan_buckets(leaves, 4, None)
    assert [b.leaves for b in one] == [(0, 2, 3), (1, 4)]
    assert [b.padded_bytes for b in one] == [528, 24]
    assert one[0].bytes == 520 and one[1].bytes == 16
    small = zero.plan_buckets(leaves, 4, 128)
    assert [b.leaves for b in small] == [(0, 2), (1, 4), (3,)]  # 100 floats get their own
    assert small[1].dtype == jnp.dtype(bf16)
    with pytest.raises(ValueError, match=r"bucket_bytes=-1.*positive int.*or None"):
        zero.plan_buckets(leaves, 4, -1)


@pytest.mark.standard_dtype_promotion
def test_sharded_state_specs():
    params = {
        "w": jax.ShapeDtypeStruct((16,), jnp.float32),
        "b": jax.ShapeDtypeStruct((4,), jnp.float32),
    }
    specs = zero.sharded_state_specs(optax.adam(1e-3), params, "data")
    adam = specs[0]
    assert adam.mu == {"w": P("data"), "b": P("data")}
    assert adam.nu == {"w": P("data"), "b": P("data")}
    assert adam.count == P()


@pytest.mark.standard_dtype_promotion
def test_global_norm_hook_is_restored():
    original = optax.tree.norm
    with pytest.raises(RuntimeError), zero.global_norm_hook():
        assert optax.tree.norm is not original
        raise RuntimeError
    assert optax.tree.norm is original
    assert optax.tree_utils.tree_norm is original


@pytest.mark.standard_dtype_promotion
def test_clip_by_global_norm_outside_shard_map_equals_optax():
    grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": -jnp.ones(4)}
    ours, _ = zero.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
