"""Collectives, linears, sequence parallelism and ZeRO buckets against a naive mesh loop.

In the manner of JAX's `shmap_reference`: the reference (`utils.NaiveMesh`) slices
the global inputs for every index of `np.ndindex(mesh shape)`, computes each device's
block with numpy and writes every collective as an explicit numpy sum or
concatenation over the loop. The kernel runs under `jax.shard_map` on a small mesh
with axes ("a", "b") (`utils.KERNEL_MESHES`) and every device's block is compared,
replicated copies included (`utils.per_device`). Kernels whose transpose matters are
also differentiated (`jax.vjp`) against jnp on the full arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shardlax import kernels as K
from tests import utils

MESHES = utils.KERNEL_MESHES


_meshes, _rand, _sharded = utils.kernel_and_naive_mesh, utils.rand, utils.sharded_kernel


# ----------------------------------------------------- collectives


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("axes", ["b", ("a", "b")], ids=str)
def test_all_reduce_and_max(shape, axes):
    mesh, nm = _meshes(shape)
    x = _rand(0, 4, 8)
    blocks = nm.shard(x, P("a", "b"))
    got = utils.per_device(lambda x: K.all_reduce(x, axes), mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.psum(blocks, axes))
    got = utils.per_device(lambda x: K.all_reduce_max(x, axes), mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.pmax(blocks, axes), exact=True)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize(("axes", "axis"), [("b", 1), (("a", "b"), 0)], ids=str)
def test_all_gather_and_gather_bits(shape, axes, axis):
    mesh, nm = _meshes(shape)
    for dtype in (np.float32, jnp.bfloat16):
        x = _rand(1, 4, 8).astype(dtype)
        want = nm.all_gather(nm.shard(x, P("a", "b")), axes, axis)
        for kernel in (K.all_gather, K.gather_bits):
            got = utils.per_device(
                lambda x, kernel=kernel: kernel(x, axes, axis=axis), mesh, [P("a", "b")], x
            )
            utils.assert_per_device(got, want, exact=True)
    assert K.gather_bits_dtype(jnp.bfloat16) == jnp.uint16
    assert K.gather_bits_dtype(jnp.float8_e4m3fn) == jnp.uint8
    assert K.gather_bits_dtype(jnp.float32) is None and K.gather_bits_dtype(jnp.int8) is None


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_all_gather_gradient_is_reduce_scatter(shape):
    mesh, nm = _meshes(shape)
    x, cot = _rand(2, 4, 8), _rand(3, 4, 8 * shape[1])
    # every device's gathered copy times its own cotangent block: d x = sum of the cotangents
    f = _sharded(lambda x: K.all_gather(x, "b", axis=1, invariant=False), mesh,
                 P("a", "b"), P("a", "b"))  # fmt: skip
    g = jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
    blocks = nm.shard(cot, P("a", "b"))  # device (i, j) holds its cotangent of the gathered [., 8]
    want = nm.psum_scatter(blocks, "b", axis=1)
    utils.assert_close(g, nm.unshard(want, P("a", "b")))


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("axes", ["b", ("a", "b")], ids=str)
def test_reduce_scatter(shape, axes):
    mesh, nm = _meshes(shape)
    x = _rand(4, 4 * shape[0], 8 * shape[1])  # every device a distinct [4, 8] block
    got = utils.per_device(lambda x: K.reduce_scatter(x, axes, axis=0), mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.psum_scatter(nm.shard(x, P("a", "b")), axes, axis=0))


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_ppermute_ring_shift_all_to_all(shape):
    mesh, nm = _meshes(shape)
    n = shape[1]
    x = _rand(5, 4 * shape[0], 8 * n)
    blocks = nm.shard(x, P("a", "b"))
    ring = [(i, (i + 1) % n) for i in range(n)]
    got = utils.per_device(lambda x: K.ring_shift(x, "b", n), mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.ppermute(blocks, "b", ring), exact=True)
    partial = [(0, n - 1)]  # one sender: every other device receives zeros
    got = utils.per_device(lambda x: K.ppermute(x, "b", partial), mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.ppermute(blocks, "b", partial), exact=True)
    a2a = lambda x: K.all_to_all(x, "b", split_axis=1, concat_axis=0)
    got = utils.per_device(a2a, mesh, [P("a", "b")], x)
    utils.assert_per_device(got, nm.all_to_all(blocks, "b", 1, 0), exact=True)


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_axis_index_and_size(shape):
    mesh, nm = _meshes(shape)

    def body(x):
        size = jnp.asarray([K.axis_size("a"), K.axis_size("b"), K.axis_size(("a", "b"))])
        return jnp.stack([K.axis_index("a"), K.axis_index("b"), K.axis_index(("a", "b"))]), size

    got_index, got_size = utils.per_device(body, mesh, [P()], np.zeros(()))
    for idx in nm.indices:
        want = [nm.position(idx, a) for a in ("a", "b", ("a", "b"))]
        np.testing.assert_array_equal(got_index[idx], want)
        np.testing.assert_array_equal(got_size[idx], [shape[0], shape[1], math.prod(shape)])


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("cast", ["ensure_varying", "share_input"])
def test_varying_cast_transposes_to_a_sum(shape, cast):
    """`ensure_varying` / `share_input`: values unchanged, types varying, d x summed over 'b'."""
    mesh, _ = _meshes(shape)
    n = shape[1]

    def body(x, w):
        xv = K.ensure_varying(x, ("b",)) if cast == "ensure_varying" else K.share_input(x, "b")
        assert "b" in K.varying_axes(xv) and "b" not in K.varying_axes(x)
        return xv * w

    f = _sharded(body, mesh, (P("a", None), P("a", "b")), P("a", "b"))
    x, w, cot = _rand(6, 4, 8), _rand(7, 4, 8 * n), _rand(8, 4, 8 * n)
    utils.assert_vjp_close(f, lambda x, w: jnp.tile(x, (1, n)) * w, (x, w), cot)


# ----------------------------------------------------- linears


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("gather_output", [False, True])
def test_column_parallel_matmul(shape, gather_output):
    mesh, nm = _meshes(shape)
    x, w, b = _rand(10, 4, 8), _rand(11, 8, 16), _rand(12, 16)
    specs = [P("a", None), P(None, "b"), P("b")]
    kernel = lambda x, w, b: K.column_parallel_matmul(x, w, b, axis_name="b",
                                                      gather_output=gather_output)  # fmt: skip
    want = nm.map(
        lambda x, w, b: x @ w + b, *(nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    )
    if gather_output:
        want = nm.all_gather(want, "b", axis=1)
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, x, w, b), want)
    out = P("a", None) if gather_output else P("a", "b")
    ref = lambda x, w, b: x @ w + b[None]
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), out), ref, (x, w, b),
                           _rand(13, 4, 16))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("input_is_parallel", [True, False])
def test_row_parallel_matmul(shape, input_is_parallel):
    mesh, nm = _meshes(shape)
    n = shape[1]
    x, w, b = _rand(14, 4, 16), _rand(15, 16, 8), _rand(16, 8)
    specs = [P("a", "b") if input_is_parallel else P("a", None), P("b", None), P()]
    kernel = lambda x, w, b: K.row_parallel_matmul(x, w, b, axis_name="b",
                                                   input_is_parallel=input_is_parallel)  # fmt: skip
    xs, ws, bs = (nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    if not input_is_parallel:  # each device slices its columns of the replicated x
        xs = {i: v[:, nm.position(i, "b") * 16 // n :][:, : 16 // n] for i, v in xs.items()}
    partial = nm.map(lambda x, w: x @ w, xs, ws)
    want = nm.map(lambda y, b: y + b, nm.psum(partial, "b"), bs)
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, x, w, b), want)
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), P("a", None)),
                           lambda x, w, b: x @ w + b[None], (x, w, b), _rand(17, 4, 8))  # fmt: skip


def test_matmul_last_contracts_the_last_dim():
    mesh, nm = _meshes((2, 2))
    x, w = _rand(18, 2, 3, 8), _rand(19, 8, 4)
    got = utils.per_device(K.matmul_last, mesh, [P("a"), P()], x, w)
    want = nm.map(lambda x, w: np.einsum("btd,df->btf", x, w), nm.shard(x, P("a")),
                  nm.replicate(w))  # fmt: skip
    utils.assert_per_device(got, want)


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_parallel_einsum_column_and_row(shape):
    mesh, nm = _meshes(shape)
    # column-like: heads 'n' of the kernel split over 'b', bias [n, h] split with them
    x, w, b = _rand(20, 2, 4, 8), _rand(21, 8, 4, 2), _rand(22, 4, 2)
    specs = [P("a"), P(None, "b"), P("b")]
    col = lambda x, w, b: K.parallel_einsum("btd,dnh->btnh", x, w, b, split="n", axis_name="b")
    want = nm.map(lambda x, w, b: np.einsum("btd,dnh->btnh", x, w) + b[None, None],
                  *(nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True)))  # fmt: skip
    utils.assert_per_device(utils.per_device(col, mesh, specs, x, w, b), want)
    ref = lambda x, w, b: jnp.einsum("btd,dnh->btnh", x, w) + b[None, None]
    utils.assert_vjp_close(_sharded(col, mesh, tuple(specs), P("a", None, "b")), ref,
                           (x, w, b), _rand(23, 2, 4, 4, 2))  # fmt: skip
    # row-like: the contracted 'n' split; one psum, the bias added once after it
    x, w, b = _rand(24, 2, 4, 4, 2), _rand(25, 4, 2, 8), _rand(26, 8)
    specs = [P("a", None, "b"), P("b"), P()]
    row = lambda x, w, b: K.parallel_einsum("btnh,nhd->btd", x, w, b, split="n", axis_name="b")
    xs, ws, bs = (nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    want = nm.map(lambda y, b: y + b, nm.psum(nm.map(
        lambda x, w: np.einsum("btnh,nhd->btd", x, w), xs, ws), "b"), bs)  # fmt: skip
    utils.assert_per_device(utils.per_device(row, mesh, specs, x, w, b), want)
    ref = lambda x, w, b: jnp.einsum("btnh,nhd->btd", x, w) + b[None, None]
    utils.assert_vjp_close(_sharded(row, mesh, tuple(specs), P("a")), ref, (x, w, b),
                           _rand(27, 2, 4, 8))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_parallel_einsum_batched_with_an_ellipsis(shape):
    """A split letter of the input and the output (heads), named by its kernel dim through
    an ellipsis: each device's slice alone, no collective."""
    mesh, nm = _meshes(shape)
    eq = "...nh,nhk->...nk"
    assert K.einsum_subscripts(eq, (2, 4, 4, 2), (4, 2, 3))[1][0] == "n"
    x, w, b = _rand(31, 2, 4, 4, 2), _rand(32, 4, 2, 3), _rand(33, 4, 3)
    specs = [P("a", None, "b"), P("b"), P("b")]
    kernel = lambda x, w, b: K.parallel_einsum(eq, x, w, b, split=0, axis_name="b")
    want = nm.map(lambda x, w, b: np.einsum("btnh,nhk->btnk", x, w) + b[None, None],
                  *(nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True)))  # fmt: skip
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, x, w, b), want)
    ref = lambda x, w, b: jnp.einsum("btnh,nhk->btnk", x, w) + b[None, None]
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), P("a", None, "b")), ref,
                           (x, w, b), _rand(34, 2, 4, 4, 3))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_fused_column_matmul(shape):
    """Each device gathers the fused kernel and keeps its columns of every part."""
    mesh, nm = _meshes(shape)
    n, f = shape[1], 8  # f: the width of one part
    x, w, b = _rand(28, 4, 8), _rand(29, 8, 2 * f), _rand(30, 2 * f)
    specs = [P("a", None), P(None, "b"), P("b")]
    kernel = lambda x, w, b: K.fused_column_matmul(x, w, b, parts=2, axis_name="b")
    xs, ws, bs = (nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    w_full, b_full = nm.all_gather(ws, "b", axis=1), nm.all_gather(bs, "b", axis=0)
    got = utils.per_device(kernel, mesh, specs, x, w, b)
    for p in range(2):
        for i in nm.indices:
            j = nm.position(i, "b")
            cols = slice(p * f + j * f // n, p * f + (j + 1) * f // n)
            utils.assert_close(got[p][i], xs[i] @ w_full[i][:, cols] + b_full[i][cols])
    ref = lambda x, w, b: tuple(jnp.split(x @ w + b[None], 2, axis=-1))
    cot = (_rand(31, 4, f), _rand(32, 4, f))
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), (P("a", "b"), P("a", "b"))),
                           ref, (x, w, b), cot)  # fmt: skip


# ----------------------------------------------------- sequence parallelism


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_sequence_gather_scatter_enter_exit(shape):
    mesh, nm = _meshes(shape)
    n = shape[1]
    x = _rand(33, 2, 8, 4)  # [B, S, D], S split over 'b'
    xs = nm.shard(x, P("a", "b"))
    gathered = nm.all_gather(xs, "b", axis=1)
    for kernel in (K.gather_sequence, lambda x, ax: K.enter_tensor_parallel(
            x, ax, sequence_parallel=True)):  # fmt: skip
        got = utils.per_device(lambda x, k=kernel: k(x, "b"), mesh, [P("a", "b")], x)
        utils.assert_per_device(got, gathered, exact=True)
    got = utils.per_device(lambda x: K.enter_tensor_parallel(x, "b", sequence_parallel=False),
                           mesh, [P("a")], x)  # fmt: skip
    utils.assert_per_device(got, nm.shard(x, P("a")), exact=True)
    partial = _rand(34, 2, 8, 4 * n)  # each device a distinct partial [B, S, 4]
    ps = nm.shard(partial, P("a", None, "b"))
    for sp in (True, False):
        want = nm.psum_scatter(ps, "b", axis=1) if sp else nm.psum(ps, "b")
        kernels = [lambda p, sp=sp: K.exit_tensor_parallel(p, "b", sequence_parallel=sp)]
        if sp:
            kernels.append(lambda p: K.scatter_sequence(p, "b"))
        for kernel in kernels:
            got = utils.per_device(kernel, mesh, [P("a", None, "b")], partial)
            utils.assert_per_device(got, want)


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_sequence_parallel_column_and_row_matmul(shape):
    mesh, nm = _meshes(shape)
    x, w, b = _rand(35, 2, 8, 8), _rand(36, 8, 16), _rand(37, 16)
    specs = [P("a", "b"), P(None, "b"), P("b")]
    col = lambda x, w, b: K.sequence_parallel_column_matmul(x, w, b, axis_name="b")
    xs, ws, bs = (nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    want = nm.map(lambda x, w, b: x @ w + b, nm.all_gather(xs, "b", axis=1), ws, bs)
    utils.assert_per_device(utils.per_device(col, mesh, specs, x, w, b), want)
    ref = lambda x, w, b: x @ w + b[None, None]
    utils.assert_vjp_close(_sharded(col, mesh, tuple(specs), P("a", None, "b")), ref, (x, w, b),
                           _rand(38, 2, 8, 16))  # fmt: skip

    x, w, b = _rand(39, 2, 8, 16), _rand(40, 16, 8), _rand(41, 8)
    specs = [P("a", None, "b"), P("b", None), P()]
    row = lambda x, w, b: K.sequence_parallel_row_matmul(x, w, b, axis_name="b")
    xs, ws, bs = (nm.shard(v, s) for v, s in zip((x, w, b), specs, strict=True))
    partial = nm.map(lambda x, w: x @ w, xs, ws)
    want = nm.map(lambda y, b: y + b, nm.psum_scatter(partial, "b", axis=1), bs)
    utils.assert_per_device(utils.per_device(row, mesh, specs, x, w, b), want)
    utils.assert_vjp_close(_sharded(row, mesh, tuple(specs), P("a", "b")), ref, (x, w, b),
                           _rand(42, 2, 8, 8))  # fmt: skip


# ----------------------------------------------------- ZeRO buckets

SHAPES = [(5, 3), (7,), (), (2, 2, 3)]


def _rows(x, n):
    """numpy: flattened, zero-padded to n * ceil(size / n), as [n, S]."""
    s = math.ceil(np.size(x) / n)
    return np.pad(np.ravel(x), (0, n * s - np.size(x))).reshape(n, s)


def _stacked(shape, seed, leaf_shape, dtype=np.float32):
    """One distinct value per device: global [A, B, *leaf_shape], spec P('a', 'b')."""
    return _rand(seed, *shape, *leaf_shape, dtype=dtype)


def test_pack_unpack_and_shard_size():
    leaves = [_rand(43 + k, *s) for k, s in enumerate(SHAPES)]
    for n in (1, 3, 4):
        assert [K.shard_size(math.prod(s), n) for s in SHAPES] == [
            math.ceil(math.prod(s) / n) for s in SHAPES
        ]
        bucket, unpacked = jax.jit(
            lambda v, n=n: (b := K.pack_bucket(v, n), K.unpack_bucket(b, SHAPES, n))
        )(leaves)
        np.testing.assert_array_equal(bucket, np.concatenate([_rows(v, n) for v in leaves], 1))
        for got, want in zip(unpacked, leaves, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("axes", ["b", ("a", "b")], ids=str)
def test_gradient_buckets(shape, axes):
    """reduce-scatter (ZeRO-2), all-reduce then shard (ZeRO-1), all-reduce (dp), local_shard."""
    mesh, nm = _meshes(shape)
    n = nm.size(axes)
    grads = [_stacked(shape, 50 + k, s) for k, s in enumerate(SHAPES)]
    specs = [P("a", "b")] * len(grads)
    blocks = [{i: v[i] for i in nm.indices} for v in grads]  # device i's own gradient
    summed = [nm.psum(v, axes) for v in blocks]
    want_shards = [{i: _rows(s[i], n)[nm.position(i, axes)] for i in nm.indices} for s in summed]

    def run(kernel):
        body = lambda *g: kernel([x.reshape(x.shape[2:]) for x in g], axes)
        return utils.per_device(body, mesh, specs, *grads)

    for kernel in (K.reduce_scatter_bucket, K.all_reduce_then_shard_bucket):
        for got, want in zip(run(kernel), want_shards, strict=True):
            utils.assert_per_device(got, want)
    for got, want in zip(run(K.all_reduce_bucket), summed, strict=True):
        utils.assert_per_device(got, want)
    full = _rand(60, 5, 3)  # replicated: each device slices its own row, no collective
    got = utils.per_device(lambda x: K.local_shard(x, axes), mesh, [P()], full)
    utils.assert_per_device(got, {i: _rows(full, n)[nm.position(i, axes)] for i in nm.indices},
                            exact=True)  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=str)
def test_all_gather_bucket(shape, dtype):
    mesh, nm = _meshes(shape)
    axes, n = ("a", "b"), math.prod(shape)
    sizes = [math.ceil(math.prod(s) / n) for s in SHAPES]
    shards = [_stacked(shape, 70 + k, (s,), dtype) for k, s in enumerate(sizes)]
    body = lambda *s: K.all_gather_bucket([x.reshape(x.shape[2:]) for x in s], SHAPES, axes)
    got = utils.per_device(body, mesh, [P("a", "b")] * len(shards), *shards)
    for k, (leaf_shape, g) in enumerate(zip(SHAPES, got, strict=True)):
        rows = {i: np.stack([shards[k][j] for j in nm.group(i, axes)]) for i in nm.indices}
        want = {i: r.ravel()[: math.prod(leaf_shape)].reshape(leaf_shape) for i, r in rows.items()}
        utils.assert_per_device(g, want, exact=True)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize(("ord", "squared"), [(None, False), (2, True), (1, False), ("inf", False)])
def test_sharded_tree_norm(shape, ord, squared):
    """A leaf split over both axes, one over 'b' only, one replicated: each counted once."""
    mesh, _ = _meshes(shape)
    leaves = [_rand(80, 4, 8), _rand(81, 4, 3), _rand(82, 5)]
    specs = (P("a", "b"), P("b"), P())
    body = lambda *t: K.sharded_tree_norm(list(t), ord=ord, squared=squared)
    got = _sharded(body, mesh, specs, P())(*leaves)
    flat = np.concatenate([np.ravel(v) for v in leaves]).astype(np.float64)
    want = {None: np.linalg.norm(flat), 2: np.sum(flat**2), 1: np.sum(np.abs(flat)),
            "inf": np.max(np.abs(flat))}[ord]  # fmt: skip
    utils.assert_close(got, want)
