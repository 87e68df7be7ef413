"""`shardlax.fsdp.fully_shard` on arbitrary NNX modules equals the unwrapped module.

The reference is the same flax module, unwrapped, on the full arrays on one
device; it never calls shardlax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.fsdp import fully_shard, fully_shard_scan
from shardlax.precision import MixedPrecision
from tests import utils

D = 16


class Block(nnx.Module):
    """A pre-norm residual MLP block: LayerNorm -> Linear -> gelu -> Linear, + x."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


MODULES = {
    "Linear": (lambda: nnx.Linear(D, 8, rngs=nnx.Rngs(0)), "float"),
    "Embed": (lambda: nnx.Embed(24, D, rngs=nnx.Rngs(0)), "ids"),
    "LayerNorm": (lambda: nnx.LayerNorm(D, rngs=nnx.Rngs(0)), "float"),
    "RMSNorm": (lambda: nnx.RMSNorm(D, rngs=nnx.Rngs(0)), "float"),
    "Block": (lambda: Block(D, nnx.Rngs(0)), "float"),
}


def _randomize(module, seed):
    """Non-trivial values for every parameter (norm scales 1 and biases 0 hide bugs)."""
    params = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape, x.dtype) * 0.5 for k, x in zip(keys, leaves, strict=True)]
    nnx.update(module, jax.tree.unflatten(tree, new))


def _make(name):
    make, kind = MODULES[name]
    ref, sharded = make(), make()
    _randomize(ref, 1)
    _randomize(sharded, 1)
    if kind == "ids":
        x = jax.random.randint(jax.random.key(2), (8, 3), 0, 24)
    else:
        x = jax.random.normal(jax.random.key(2), (8, 3, D))
    return ref, sharded, x


def _loss(m, x):
    return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))


def _check(ref, wrapped, x, dtype=jnp.float32):
    y = nnx.jit(lambda m, x: m(x))(wrapped, x)
    y_ref = ref(np.asarray(x) if dtype == jnp.float32 else jnp.asarray(x).astype(dtype))
    utils.assert_close(y, y_ref, dtype, "forward")
    grads = nnx.jit(nnx.grad(_loss))(wrapped, x)
    ref_grads = nnx.grad(_loss)(ref, np.asarray(x) if dtype == jnp.float32 else x.astype(dtype))
    got = jax.tree_util.tree_flatten_with_path(nnx.state(grads, nnx.Param))[0]
    want = jax.tree.leaves(nnx.state(ref_grads, nnx.Param))
    assert len(got) == len(want)
    for (path, g), r in zip(got, want, strict=True):
        utils.assert_close(g, r, dtype, jax.tree_util.keystr(path))
    return grads


@pytest.mark.parametrize("mesh_shape", [(2, 1, 1), (1, 2, 2), (2, 4, 1), (1, 8, 1)], ids=str)
def test_fully_shard_block_matches_unwrapped(mesh_shape):
    """fsdp = 1, 2, 4, 8 (with data and model axes around it)."""
    mesh = utils.mesh(*mesh_shape)
    ref, module, x = _make("Block")
    wrapped = fully_shard(module, mesh=mesh)
    grads = _check(ref, wrapped, x)
    n = mesh.shape["fsdp"]
    for p, g in zip(
        jax.tree.leaves(nnx.state(wrapped, nnx.Param)),
        jax.tree.leaves(nnx.state(grads, nnx.Param)),
        strict=True,
    ):
        total = p.size * p.dtype.itemsize
        assert {s.data.nbytes for s in p.addressable_shards} == {total // n}
        assert g.sharding.is_equivalent_to(p.sharding, p.ndim)  # grads leave reduce-scattered


@pytest.mark.parametrize("name", ["Linear", "Embed", "LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fully_shard_any_module(name, reshard):
    mesh = utils.mesh(2, 4, 1)
    ref, module, x = _make(name)
    _check(ref, fully_shard(module, mesh=mesh, reshard_after_forward=reshard), x)


def test_fully_shard_dims_and_specs():
    mesh = utils.mesh(1, 8, 1)
    emb = fully_shard(nnx.Embed(12, 16, rngs=nnx.Rngs(0)), mesh=mesh)  # 8 does not divide 12
    assert emb.fsdp_config.dims == (1,)
    assert emb.embedding[...].sharding.spec == P(None, "fsdp")
    lin = fully_shard(nnx.Linear(16, 24, rngs=nnx.Rngs(0)), mesh=mesh)
    assert lin.param_paths() == ("bias", "kernel")
    assert lin.fsdp_config.dims == (0, 0)
    # the same values as before wrapping
    np.testing.assert_array_equal(
        np.asarray(lin.kernel[...]),
        np.asarray(nnx.Linear(16, 24, rngs=nnx.Rngs(0)).kernel[...]),
    )


@pytest.mark.parametrize(("reshard", "gathers"), [(True, 8), (False, 6)], ids=["reshard", "keep"])
def test_fully_shard_block_collectives(reshard, gathers):
    """Per step on (2, 2, 1): each of 6 params gathered once, plus the two kernels again
    when resharding (their values feed the input gradients of the backward); 6
    reduce-scatters; 6 shard all-reduces over data; + the scalar loss."""
    mesh = utils.mesh(2, 2, 1)
    _, module, x = _make("Block")
    wrapped = fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fn = nnx.jit(nnx.value_and_grad(_loss))
    report = audit.collectives(fn, wrapped, x, mesh=mesh)
    declared = wrapped.declared_collectives(regathered=("down.kernel", "up.kernel"))
    declared.append(audit.Declared("all-reduce", ("data", "fsdp"), "f32", 1, 4, "loss"))
    comparison = audit.compare(declared, report)
    assert comparison.ok, comparison.table()
    assert report.counts()[("all-gather", ("fsdp",), "f32")] == gathers
    assert report.counts()[("reduce-scatter", ("fsdp",), "f32")] == 6


@pytest.mark.standard_dtype_promotion  # flax's LayerNorm mixes f32 statistics with bf16 x
def test_fully_shard_mixed_precision():
    """bf16 gathers (u16 bits) and compute, f32 reduce-scatters, f32 gradients."""
    mesh = utils.mesh(1, 4, 1)
    ref, module, x = _make("Block")
    policy = MixedPrecision(param_dtype=jnp.bfloat16, reduce_dtype=jnp.float32)
    wrapped = fully_shard(module, mesh=mesh, policy=policy)
    # reference: the unwrapped block with its parameters rounded to bf16
    params = nnx.state(ref, nnx.Param)
    nnx.update(ref, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
    grads = _check(ref, wrapped, x, jnp.bfloat16)
    assert {g.dtype for g in jax.tree.leaves(nnx.state(grads, nnx.Param))} == {jnp.dtype("float32")}
    report = audit.collectives(nnx.jit(nnx.value_and_grad(_loss)), wrapped, x, mesh=mesh)
    declared = wrapped.declared_collectives(regathered=("down.kernel", "up.kernel"))
    declared.append(audit.Declared("all-reduce", ("fsdp",), "f32", 1, 4, "loss"))
    comparison = audit.compare(declared, report)
    assert comparison.ok, comparison.table()
    assert {c.dtype for c in report.where("all-gather")} == {"u16"}
    assert {c.dtype for c in report.where("reduce-scatter")} == {"f32"}


@pytest.mark.parametrize(
    ("remat", "reshard", "gathers"),
    [(True, True, 4), (False, True, 3), (False, False, 2)],
    ids=["remat", "reshard", "keep"],
)
def test_fully_shard_scan_matches_loop(remat, reshard, gathers):
    """3 stacked Linear+tanh layers scanned on (2, 2, 1) equal a Python loop of plain jnp.

    HLO all-gathers (each in a loop, run once per layer): remat re-gathers kernel and
    bias in the backward loop (4), fsdp_call only the kernel (3), keep none (2)."""
    mesh = utils.mesh(2, 2, 1)

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, h):
            return jnp.tanh(self.linear(h))

    model = fully_shard_scan(
        Layer, 3, rngs=nnx.Rngs(0), mesh=mesh, remat=remat, reshard_after_forward=reshard
    )
    w, b = np.asarray(model.linear.kernel[...]), np.asarray(model.linear.bias[...])
    x = jax.random.normal(jax.random.key(0), (4, D))

    def ref(w, b, x):
        for i in range(3):
            x = jnp.tanh(x @ w[i] + b[i][None, :])
        return jnp.sum(jnp.sin(x))

    fn = nnx.jit(nnx.value_and_grad(_loss))
    val, grads = fn(model, x)
    ref_val, (rw, rb) = jax.value_and_grad(ref, argnums=(0, 1))(w, b, np.asarray(x))
    utils.assert_close(val, ref_val)
    utils.assert_close(grads["linear"]["kernel"][...], rw, err_msg="dW")
    utils.assert_close(grads["linear"]["bias"][...], rb, err_msg="db")
    report = audit.collectives(fn, model, x, mesh=mesh)
    assert all(c.in_loop for c in report.where("all-gather"))
    assert len(report.where("all-gather", ("fsdp",))) == gathers
    assert report.counts()[("reduce-scatter", ("fsdp",), "f32")] == 2
    # derived from the scanned gradient, no hand-written regathered= list
    declared = model.declared_collectives(x)
    regathered = {"remat": ("linear.bias", "linear.kernel"), "reshard": ("linear.kernel",)}
    mode = "remat" if remat else "reshard" if reshard else "keep"
    assert declared == model.declared_collectives(regathered=regathered.get(mode, ()))
    declared.append(audit.Declared("all-reduce", ("data", "fsdp"), "f32", 1, 4, "loss"))
    cmp = audit.compare(declared, report)
    assert cmp.ok, cmp.table()


def test_fully_shard_output_dtype():
    """`output_dtype` casts the unit's outputs; inputs are cast to `param_dtype` on entry."""
    mesh = utils.mesh(1, 2, 1)
    policy = MixedPrecision(param_dtype=jnp.bfloat16, output_dtype=jnp.float32)
    ref = nnx.Linear(D, 8, rngs=nnx.Rngs(0))
    wrapped = fully_shard(nnx.Linear(D, 8, rngs=nnx.Rngs(0)), mesh=mesh, policy=policy)
    x = jax.random.normal(jax.random.key(3), (4, D))
    y = nnx.jit(lambda m, x: m(x))(wrapped, x)
    assert y.dtype == jnp.float32
    bf = lambda a: jnp.asarray(a).astype(jnp.bfloat16)
    y_ref = bf(x) @ bf(ref.kernel[...]) + bf(ref.bias[...])[None, :]
    utils.assert_close(y, y_ref, jnp.bfloat16)


def test_error_fully_shard_axis_missing():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    with pytest.raises(
        ValueError,
        match=r"fully_shard\(Linear\)\(axis='fsdp'\): mesh axis 'fsdp' is not in the mesh, whose "
        r"axes are \('data',\) with sizes \(2,\)\. Pass axis= one of \('data',\)",
    ):
        fully_shard(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), mesh=mesh)


def test_fully_shard_keeps_indivisible_parameters_whole():
    """A (10,) bias on 4 devices: kept whole (replicated), its gradient all-reduced over
    the batch axes (DeepSpeed's persistence threshold); the (8, 10) kernel is split."""
    mesh = utils.mesh(1, 4, 1)
    make = lambda: nnx.Linear(8, 10, rngs=nnx.Rngs(0))
    ref, sharded = make(), make()
    _randomize(ref, 1)
    _randomize(sharded, 1)
    wrapped = fully_shard(sharded, mesh=mesh)
    assert wrapped.param_paths() == ("bias", "kernel")
    assert wrapped.fsdp_config.dims == (None, 0)
    assert wrapped.fsdp_config.param_specs == (P(None), P("fsdp", None))
    assert wrapped.bias[...].shape == (10,)  # logical shapes unchanged
    x = jax.random.normal(jax.random.key(2), (8, 8))
    _check(ref, wrapped, x)
    fn = nnx.jit(nnx.grad(_loss))
    report = audit.collectives(fn, wrapped, x, mesh=mesh)
    declared = wrapped.declared_collectives()
    assert [d.kind for d in declared if d.why == "bias"] == ["all-reduce"]
    cmp = audit.compare(declared, report)
    assert cmp.ok, cmp.table()


def test_error_fully_shard_batch_not_dividing():
    mesh = utils.mesh(1, 4, 1)
    wrapped = fully_shard(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), mesh=mesh)
    with pytest.raises(
        ValueError,
        match=r"FSDPModule\(Linear\): input of shape \(6, 4\) has a leading dim \(the batch\) "
        r"of 6, which cannot be sharded over mesh axes \('data', 'fsdp'\) \(size 4\): 4 does "
        r"not divide 6\. Use a batch size divisible by 4",
    ):
        wrapped(jnp.ones((6, 4)))


def test_error_fully_shard_bad_policy_and_module():
    mesh = utils.mesh(1, 2, 1)
    with pytest.raises(TypeError, match=r"fully_shard\(Linear\)\(policy='bf16'\): expected a"):
        fully_shard(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), mesh=mesh, policy="bf16")
    with pytest.raises(TypeError, match=r"fully_shard\(module=function\): expected a flax"):
        fully_shard(lambda x: x, mesh=mesh)
    with pytest.raises(ValueError, match=r"the batch must be split over the fsdp axis"):
        fully_shard(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), mesh=mesh, batch_axes=("data",))
    col = shardlax.nn.ColumnParallelLinear(4, 4, mesh=mesh, rngs=nnx.Rngs(0), fsdp_axis=None)
    with pytest.raises(
        ValueError,
        match=r"fully_shard\(Sequential\): the shardlax layer ColumnParallelLinear at "
        r"'layers\.0' was built with mesh axes .*batch_axes=\('data', 'fsdp'\)"
        r".*with the same batch_axes",
    ):
        fully_shard(nnx.Sequential(col), mesh=mesh, batch_axes=("fsdp",))


@pytest.mark.parametrize("fsdp_axis", [None, "fsdp"])
def test_fully_shard_runs_shardlax_layers_inside(fsdp_axis):
    """A block of hand-built tensor-parallel layers in a unit on (1, 2, 2): the unit splits
    the layers' kernels over fsdp too (or leaves a layer with fsdp_axis to gather its own);
    forward and every gradient equal the same nnx.Linear math on one device."""
    mesh = utils.mesh(1, 2, 2)
    kw = dict(mesh=mesh, fsdp_axis=fsdp_axis)
    col = shardlax.nn.ColumnParallelLinear(D, 2 * D, rngs=nnx.Rngs(1), **kw)
    row = shardlax.nn.RowParallelLinear(2 * D, D, rngs=nnx.Rngs(2), **kw)
    ref = nnx.Sequential(nnx.Linear(D, 2 * D, rngs=nnx.Rngs(1)), nnx.relu,
                         nnx.Linear(2 * D, D, rngs=nnx.Rngs(2)))  # fmt: skip
    unit = fully_shard(nnx.Sequential(col, nnx.relu, row), mesh=mesh)
    assert unit.fsdp_config.param_specs[1] == P("fsdp", "model"), (
        unit.fsdp_config.param_specs
    )  # col.kernel
    assert unit.fsdp_config.owned == ((fsdp_axis is None),) * 4, unit.fsdp_config.owned
    x = jax.random.normal(jax.random.key(3), (8, D))

    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    got_l, got_g = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(unit, x)
    want_l, want_g = nnx.value_and_grad(loss, argnums=(0, 1))(ref, x)
    utils.assert_close(np.asarray(got_l), np.asarray(want_l))
    utils.assert_close(np.asarray(got_g[1]), np.asarray(want_g[1]))
    g = jax.tree.leaves(nnx.state(got_g[0], nnx.Param))
    w = jax.tree.leaves(nnx.state(want_g[0], nnx.Param))
    for a, b in zip(g, w, strict=True):
        utils.assert_close(np.asarray(a), np.asarray(b))


def test_fully_shard_in_a_model_with_shardlax_layers():
    """An FSDP unit composes with other code under one nnx.jit (layout matches at the boundary)."""
    mesh = utils.mesh(1, 4, 1)
    ref, module, x = _make("Block")
    wrapped = fully_shard(module, mesh=mesh)
    ref2 = nnx.Linear(D, 4, rngs=nnx.Rngs(5))
    head = shardlax.nn.RowParallelLinear(D, 4, mesh=mesh, rngs=nnx.Rngs(5), input_is_parallel=False)

    def loss(b, h, x):
        return jnp.sum(jnp.sin(h(b(x))))

    g_b, g_h = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(wrapped, head, x)
    r_b, r_h = nnx.grad(loss, argnums=(0, 1))(ref, ref2, np.asarray(x))
    utils.assert_close(g_h["kernel"][...], r_h["kernel"][...])
    utils.assert_close(g_b["up"]["kernel"][...], r_b["up"]["kernel"][...])


def test_a_submodule_named_value_keeps_its_path():
    """nnx.MultiHeadAttention has a `value` projection: its parameters are not the Variable's
    `.value` (their paths once lost that level, so the spec metadata and lookups missed it)."""
    mesh = utils.mesh(1, 2, 1)
    attn = nnx.MultiHeadAttention(2, D, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
    unit = fully_shard(attn, mesh=mesh)
    assert unit.spec_of(("value", "kernel")) == P("fsdp", None, None)
    assert unit.value.kernel.get_metadata()["out_sharding"] == P("fsdp", None, None)
