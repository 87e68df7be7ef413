"""Attention, MLP, norm, cross-entropy, embedding, dropout, FSDP kernels vs a naive mesh loop.

As in tests/test_kernels_reference.py: every device's block computed by the kernel
under `jax.shard_map` on a small ("a", "b") mesh equals the block a numpy loop over
`np.ndindex(mesh shape)` computes from the sliced global inputs, its collectives
written as numpy sums and concatenations (`utils.NaiveMesh`); gradients (`jax.vjp`)
against jnp on the full arrays. Axis "b" plays the model axis, "a" the batch (or
fsdp) axis.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shardlax import kernels as K
from tests import utils

MESHES = utils.KERNEL_MESHES
#: Gradients of the attention and MLP kernels compile two backward programs of a few
#: seconds each: checked on one mesh (the forward on every mesh of `MESHES`).
GRAD_MESH = MESHES[0]


_meshes, _rand, _sharded = utils.kernel_and_naive_mesh, utils.rand, utils.sharded_kernel


def _shard_all(nm, values, specs):
    return [nm.shard(v, s) for v, s in zip(values, specs, strict=True)]


# ----------------------------------------------------- references (xp: np or jnp)


def _rope(xp, t, theta=10000.0):
    """RoPE, half split, positions 0..S-1 on axis 1 of t [B, S, H, d]."""
    s, d = t.shape[1], t.shape[-1]
    half = d // 2
    angle = np.arange(s)[:, None] * theta ** (-2.0 * np.arange(half)[None, :] / d)
    c = np.cos(angle).astype(np.float32)[None, :, None, :]
    sn = np.sin(angle).astype(np.float32)[None, :, None, :]
    a, b = t[..., :half], t[..., half:]
    return xp.concatenate([a * c - b * sn, b * c + a * sn], axis=-1)


def _attend(xp, q, k, v):
    """Causal grouped-query attention: q [B, S, H, d]; k, v [B, S, Hkv, d] repeated to H heads."""
    s, h, d = q.shape[1], q.shape[2], q.shape[3]
    k, v = (xp.repeat(t, h // t.shape[2], axis=2) for t in (k, v))  # head j reads kv j // g
    sc = xp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(d))
    sc = xp.where(np.tril(np.ones((s, s), bool))[None, None], sc, np.float32(-1e30))
    p = xp.exp(sc - sc.max(-1, keepdims=True))
    return xp.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def _gelu(xp, h):
    return 0.5 * h * (1 + xp.tanh(np.float32(np.sqrt(2 / np.pi)) * (h + 0.044715 * h**3)))


def _silu(xp, h):
    return h / (1 + xp.exp(-h))


# ----------------------------------------------------- attention

HD, H, HKV = 2, 8, 4  # head dim, query heads, key/value heads (both split over "b")


def _attention_full(xp, x, wq, wk, wv, wo, bq, bk, bv, bo):
    b, s = x.shape[:2]
    q = (x @ wq + bq[None, None]).reshape(b, s, -1, HD)
    k = (x @ wk + bk[None, None]).reshape(b, s, -1, HD)
    v = (x @ wv + bv[None, None]).reshape(b, s, -1, HD)
    o = _attend(xp, _rope(xp, q), _rope(xp, k), v).reshape(b, s, -1)
    return o @ wo + bo[None, None]


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_head_parallel_attention(shape, sp):
    mesh, nm = _meshes(shape)
    d = 8
    args = [_rand(0, 2, 8, d), _rand(1, d, H * HD), _rand(2, d, HKV * HD), _rand(3, d, HKV * HD),
            _rand(4, H * HD, d), _rand(5, H * HD), _rand(6, HKV * HD), _rand(7, HKV * HD),
            _rand(8, d)]  # fmt: skip
    x_spec = P("a", "b") if sp else P("a")
    specs = [x_spec, *[P(None, "b")] * 3, P("b", None), *[P("b")] * 3, P()]

    def kernel(x, wq, wk, wv, wo, bq, bk, bv, bo):
        return K.head_parallel_attention(x, wq, wk, wv, wo, bq, bk, bv, bo, head_dim=HD,
                                         axis_name="b", sequence_parallel=sp)  # fmt: skip

    xs, wq, wk, wv, wo, bq, bk, bv, bo = _shard_all(nm, args, specs)
    if sp:
        xs = nm.all_gather(xs, "b", axis=1)

    def local(x, wq, wk, wv, wo, bq, bk, bv):  # this device's heads, then its partial sum
        b, s = x.shape[:2]
        q, k, v = ((x @ w + bb).reshape(b, s, -1, HD) for w, bb in ((wq, bq), (wk, bk), (wv, bv)))
        return _attend(np, _rope(np, q), _rope(np, k), v).reshape(b, s, -1) @ wo

    partial = nm.map(local, xs, wq, wk, wv, wo, bq, bk, bv)
    summed = nm.psum_scatter(partial, "b", axis=1) if sp else nm.psum(partial, "b")
    want = nm.map(lambda y, b: y + b, summed, bo)
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, *args), want)
    if shape != GRAD_MESH:
        return
    ref = lambda *a: _attention_full(jnp, *a)
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), x_spec), ref, args,
                           _rand(9, 2, 8, d))  # fmt: skip


def test_rotary_embedding_and_dot_product_attention_are_local():
    """No collectives: each device's heads from its own q, k, v blocks (heads split over 'b')."""
    mesh, nm = _meshes((2, 2))
    q, k, v = _rand(10, 2, 6, 4, 4), _rand(11, 2, 6, 2, 4), _rand(12, 2, 6, 2, 4)
    specs = [P("a", None, "b")] * 3
    got = utils.per_device(lambda t: K.rotary_embedding(t), mesh, specs[:1], q)
    utils.assert_per_device(got, nm.map(lambda t: _rope(np, t), nm.shard(q, specs[0])))
    got = utils.per_device(K.dot_product_attention, mesh, specs, q, k, v)
    want = nm.map(lambda q, k, v: _attend(np, q, k, v), *_shard_all(nm, (q, k, v), specs))
    utils.assert_per_device(got, want)


# ----------------------------------------------------- MLP and norm


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_parallel_mlp(shape, activation, sp):
    mesh, nm = _meshes(shape)
    d, f = 8, 16
    args = [_rand(20, 2, 8, d), _rand(21, d, f), _rand(22, f, d), _rand(23, f), _rand(24, d),
            _rand(25, d, f), _rand(26, f)]  # fmt: skip
    x_spec = P("a", "b") if sp else P("a")
    specs = [x_spec, P(None, "b"), P("b", None), P("b"), P(), P(None, "b"), P("b")]
    if activation != "swiglu":
        args, specs = args[:5], specs[:5]

    def kernel(*a):
        return K.parallel_mlp(*a, activation=activation, axis_name="b", sequence_parallel=sp)

    def hidden(xp, x, wu, bu, wg=None, bg=None):
        up = x @ wu + bu[(None,) * (x.ndim - 1)]
        if activation == "swiglu":
            return _silu(xp, x @ wg + bg[(None,) * (x.ndim - 1)]) * up
        return _gelu(xp, up)

    blocks = _shard_all(nm, args, specs)
    xs = nm.all_gather(blocks[0], "b", axis=1) if sp else blocks[0]
    partial = {i: hidden(np, xs[i], blocks[1][i], blocks[3][i], *(b[i] for b in blocks[5:]))
               @ blocks[2][i] for i in nm.indices}  # fmt: skip
    summed = nm.psum_scatter(partial, "b", axis=1) if sp else nm.psum(partial, "b")
    want = nm.map(lambda y, b: y + b, summed, blocks[4])
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, *args), want)
    if shape != GRAD_MESH:
        return

    def ref(x, wu, wd, bu, bd, *gate):
        return hidden(jnp, x, wu, bu, *gate) @ wd + bd[None, None]

    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), x_spec), ref, args,
                           _rand(27, 2, 8, d))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_rms_norm(shape):
    """Tokens split over both axes: local statistics; the scale's gradient summed over both."""
    mesh, nm = _meshes(shape)
    x, scale = _rand(30, 4, 8, 6), _rand(31, 6)
    specs = (P("a", "b"), P())
    kernel = lambda x, s: K.rms_norm(x, s, epsilon=1e-6)
    ref_np = lambda x, s: x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * s
    want = nm.map(ref_np, *_shard_all(nm, (x, scale), specs))
    utils.assert_per_device(utils.per_device(kernel, mesh, list(specs), x, scale), want)
    ref = lambda x, s: x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * s[None, None]
    utils.assert_vjp_close(_sharded(kernel, mesh, specs, P("a", "b")), ref, (x, scale),
                           _rand(32, 4, 8, 6))  # fmt: skip


# ----------------------------------------------------- cross-entropy and embedding


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_vocab_parallel_cross_entropy_and_global_mean(shape):
    mesh, nm = _meshes(shape)
    v_pad, vocab = 16, 13  # columns 13..15 are padding: never a target, probability 0
    logits = 10 * _rand(40, 2, 4, v_pad)
    labels = np.random.default_rng(41).integers(0, vocab, (2, 4)).astype(np.int32)
    bad = labels.copy()
    bad[0, 0] = vocab  # a padded column as label: NaN for that token
    specs = [P("a", None, "b"), P("a")]
    kernel = lambda z, t: K.vocab_parallel_cross_entropy(z, t, vocab_size=vocab, axis_name="b")

    def naive(labels):
        zs, ts = _shard_all(nm, (logits, labels), specs)
        n = nm.size("b")
        cols = {i: nm.position(i, "b") * (v_pad // n) + np.arange(v_pad // n) for i in nm.indices}
        zs = {i: np.where(cols[i] < vocab, z.astype(np.float64), -np.inf) for i, z in zs.items()}
        m = nm.pmax(nm.map(lambda z: z.max(-1), zs), "b")
        sum_exp = nm.psum({i: np.exp(zs[i] - m[i][..., None]).sum(-1) for i in nm.indices}, "b")
        picked = {}
        for i in nm.indices:
            local = ts[i] - cols[i][0]
            mine = (local >= 0) & (local < v_pad // n)
            z = np.take_along_axis(zs[i], np.where(mine, local, 0)[..., None], -1)[..., 0]
            picked[i] = np.where(mine, z - m[i], 0.0)
        target = nm.psum(picked, "b")
        return {i: np.where(ts[i] < vocab, np.log(sum_exp[i]) - target[i], np.nan)
                for i in nm.indices}  # fmt: skip

    for t in (labels, bad):
        utils.assert_per_device(utils.per_device(kernel, mesh, specs, logits, t), naive(t))

    def ref(z):
        z = jnp.where(jnp.arange(v_pad)[None, None] < vocab, z, -jnp.inf)
        picked = jnp.take_along_axis(z, jnp.asarray(labels)[..., None], -1)[..., 0]
        return jax.nn.logsumexp(z, -1) - picked

    sharded = _sharded(kernel, mesh, tuple(specs), P("a"))
    utils.assert_vjp_close(lambda z: sharded(z, labels), ref, (logits,), _rand(42, 2, 4))
    losses = _rand(43, 4, 4)
    got = utils.per_device(lambda v: K.global_mean(v, ("a", "b")), mesh, [P("a", "b")], losses)
    want = nm.map(lambda s: s / losses.size, nm.psum(nm.map(np.sum, nm.shard(losses, P("a", "b"))),
                                                     ("a", "b")))  # fmt: skip
    utils.assert_per_device(got, want)


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("mode", ["tp", "sp", "fsdp"])
def test_vocab_parallel_embed(shape, mode):
    """Owners look up their rows, zeros elsewhere, then a sum (SP: reduce-scatter); ids
    past the table embed to NaN, -1 is the last row. FSDP ("a"): ids gathered, table never."""
    mesh, nm = _meshes(shape)
    v, d = 16, 4
    table = _rand(50, v, d)
    ids = np.random.default_rng(51).integers(0, v, (2 * shape[0], 8)).astype(np.int32)
    ids_bad = ids.copy()
    ids_bad[0, :2] = [-1, v]
    owners = ("b", "a") if mode == "fsdp" else "b"
    specs = [P("a"), P(owners)]
    out_spec = P("a", "b") if mode == "sp" else P("a")
    kernel = lambda i, t: K.vocab_parallel_embed(
        i, t, num_embeddings=v, axis_name="b", sequence_parallel=mode == "sp",
        fsdp_axis="a" if mode == "fsdp" else None)  # fmt: skip

    def naive(ids):
        idb, tb = _shard_all(nm, (ids, table), specs)
        if mode == "fsdp":
            idb = nm.all_gather(idb, "a", axis=0)
        rows = {}
        for i in nm.indices:
            t = np.where(idb[i] < 0, idb[i] + v, idb[i])
            local = t - nm.position(i, owners) * tb[i].shape[0]
            mine = (local >= 0) & (local < tb[i].shape[0])
            r = np.where(mine[..., None], tb[i][np.where(mine, local, 0)], 0.0)
            rows[i] = np.where(((t < 0) | (t >= v))[..., None], np.nan, r)
        if mode == "fsdp":
            rows = nm.psum_scatter(rows, "a", axis=0)
        return nm.psum_scatter(rows, "b", axis=1) if mode == "sp" else nm.psum(rows, "b")

    for i in (ids, ids_bad):
        utils.assert_per_device(utils.per_device(kernel, mesh, specs, i, table), naive(i))
    sharded = _sharded(kernel, mesh, tuple(specs), out_spec)
    utils.assert_vjp_close(lambda t: sharded(ids, t), lambda t: jnp.take(t, ids, axis=0),
                           (table,), _rand(52, 2 * shape[0], 8, d))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_vocab_parallel_logits(shape, sp):
    mesh, nm = _meshes(shape)
    x, table = _rand(53, 2, 8, 4), _rand(54, 16, 4)
    specs = [P("a", "b") if sp else P("a"), P("b")]
    kernel = lambda x, t: K.vocab_parallel_logits(x, t, axis_name="b", sequence_parallel=sp)
    xs, tb = _shard_all(nm, (x, table), specs)
    if sp:
        xs = nm.all_gather(xs, "b", axis=1)
    want = nm.map(lambda x, t: x @ t.T, xs, tb)
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, x, table), want)
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), P("a", None, "b")),
                           lambda x, t: x @ t.T, (x, table), _rand(55, 2, 8, 16))  # fmt: skip


# ----------------------------------------------------- dropout


@pytest.mark.parametrize(
    ("shape", "broadcast_dims"), list(zip(MESHES, [(), (0,)], strict=True)), ids=str
)
def test_sharding_invariant_dropout(shape, broadcast_dims):
    """Each device's mask is its block of `jax.random.bits` / `uniform` of the whole array."""
    mesh, nm = _meshes(shape)
    key = jax.random.key(7)
    kd = np.asarray(jax.random.key_data(key))
    x = _rand(60, 4, 8, 3)
    spec = P("a", "b")
    x_shape = x.shape

    def body(x, k):
        offsets = K.shard_offsets(x.shape, spec)
        bits = K.global_uniform_bits(k, x.shape, x_shape, offsets)
        dropped = K.sharding_invariant_dropout(
            x, k, rate=0.25, global_shape=x_shape, spec=spec, broadcast_dims=broadcast_dims
        )
        return jnp.stack([jnp.asarray(o, jnp.uint32) for o in offsets]), bits, dropped

    offsets, bits, dropped = utils.per_device(body, mesh, [spec, P()], x, kd)
    want = {i: [nm.position(i, "a") * (4 // shape[0]), nm.position(i, "b") * (8 // shape[1]), 0]
            for i in nm.indices}  # fmt: skip
    utils.assert_per_device(offsets, want, exact=True)
    mask_shape = tuple(1 if d in broadcast_dims else n for d, n in enumerate(x_shape))
    draw = lambda k: (jax.random.bits(k, x_shape), jax.random.uniform(k, mask_shape))
    full_bits, uniform = jax.jit(draw)(key)  # one compile of the whole-array draws
    utils.assert_per_device(bits, nm.shard(full_bits, spec), exact=True)
    keep = np.broadcast_to(np.asarray(uniform) < 0.75, x_shape)
    want = np.where(keep, x / np.float32(0.75), 0.0).astype(np.float32)
    utils.assert_per_device(dropped, nm.shard(want, spec))


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_global_bernoulli(shape):
    """Each device's block of `jax.random.bernoulli(key, p, whole shape)`, bit for bit."""
    mesh, nm = _meshes(shape)
    key = jax.random.key(9)
    x = _rand(61, 4, 8, 3)
    spec = P("a", "b")
    body = lambda x, k: K.global_bernoulli(k, 0.6, x.shape, (4, 8, 3), spec)
    got = utils.per_device(body, mesh, [spec, P()], x, np.asarray(jax.random.key_data(key)))
    full = np.asarray(jax.jit(lambda k: jax.random.bernoulli(k, 0.6, (4, 8, 3)))(key))
    utils.assert_per_device(got, nm.shard(full, spec), exact=True)


# ----------------------------------------------------- FSDP and batch statistics


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("dtypes", [(None, None), (jnp.bfloat16, jnp.float32)], ids=str)
def test_fsdp_gather(shape, dtypes):
    """Forward: the all-gather over "a" (fsdp). Backward: every device's cotangent of its
    gathered copy, reduce-scattered over "a" and summed over "b" (data) in `reduce_dtype`."""
    mesh, nm = _meshes(shape)
    gather_dtype, reduce_dtype = dtypes
    w = _rand(70, 8, 4)
    kernel = lambda s: K.fsdp_gather(
        s, "a", dim=0, replicated_axes=("b",), gather_dtype=gather_dtype, reduce_dtype=reduce_dtype
    )
    out_dtype = np.float32 if gather_dtype is None else gather_dtype
    want = nm.all_gather(nm.shard(w.astype(out_dtype), P("a")), "a", axis=0)
    got = utils.per_device(kernel, mesh, [P("a")], w)
    utils.assert_per_device(got, want, exact=True)
    stacked = jax.jit(jax.shard_map(lambda s: kernel(s)[None, None], mesh=mesh,
                                    in_specs=P("a"), out_specs=P("a", "b")))  # fmt: skip
    cot = _rand(71, *shape, 8, 4).astype(out_dtype)  # device (i, j)'s cotangent: cot[i, j]
    (g,) = jax.vjp(stacked, utils.place(w, mesh, P("a")))[1](cot)
    blocks = {i: cot[i].astype(np.float32) for i in nm.indices}
    reduced = nm.psum(nm.psum_scatter(blocks, "a", axis=0), "b")
    assert g.dtype == jnp.float32
    utils.assert_close(g, nm.unshard(reduced, P("a")))


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("reshard", [False, True], ids=["keep", "reshard"])
def test_fsdp_call(shape, reshard):
    """One unit `tanh(x W + b)`: batch split over ("a", "b"), parameters over "a"."""
    mesh, nm = _meshes(shape)
    x, w, b = _rand(72, 8, 8), _rand(73, 8, 4), _rand(74, 4)
    gather = lambda p: {k: K.fsdp_gather(s, "a", replicated_axes=("b",)) for k, s in p.items()}
    fn = lambda p, x: jnp.tanh(x @ p["w"] + p["b"][None])
    kernel = lambda w, b, x: K.fsdp_call(fn, {"w": w, "b": b}, x, gather=gather,
                                         reshard_after_forward=reshard)  # fmt: skip
    specs = [P("a"), P("a"), P(("a", "b"))]
    ws, bs, xs = _shard_all(nm, (w, b, x), specs)
    want = nm.map(lambda w, b, x: np.tanh(x @ w + b), nm.all_gather(ws, "a", axis=0),
                  nm.all_gather(bs, "a", axis=0), xs)  # fmt: skip
    utils.assert_per_device(utils.per_device(kernel, mesh, specs, w, b, x), want)
    ref = lambda w, b, x: jnp.tanh(x @ w + b[None])
    utils.assert_vjp_close(_sharded(kernel, mesh, tuple(specs), P(("a", "b"))), ref, (w, b, x),
                           _rand(75, 8, 4))  # fmt: skip


@pytest.mark.parametrize("shape", MESHES, ids=str)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "two_pass"])
def test_global_batch_moments(shape, fast):
    mesh, nm = _meshes(shape)
    x = 3 + _rand(76, 8, 3, 4)
    axes = ("a", "b")
    kernel = lambda x: K.global_batch_moments(x, (0, 1), axes, use_fast_variance=fast)
    xs = nm.shard(x, P(axes))
    n = nm.size(axes)
    mu = nm.map(lambda s: s / n, nm.psum(nm.map(lambda v: v.mean((0, 1)), xs), axes))
    if fast:
        mu2 = nm.map(lambda s: s / n, nm.psum(nm.map(lambda v: (v**2).mean((0, 1)), xs), axes))
        var = {i: np.maximum(0.0, mu2[i] - mu[i] ** 2) for i in nm.indices}
    else:
        sq = nm.psum({i: ((xs[i] - mu[i]) ** 2).mean((0, 1)) for i in nm.indices}, axes)
        var = nm.map(lambda s: s / n, sq)
    got_mu, got_var = utils.per_device(kernel, mesh, [P(axes)], x)
    utils.assert_per_device(got_mu, mu)
    utils.assert_per_device(got_var, var)
    ref = lambda x: (x.mean((0, 1)), x.var((0, 1)))
    utils.assert_vjp_close(_sharded(kernel, mesh, P(axes), (P(), P())), ref, (x,),
                           (_rand(77, 4), _rand(78, 4)))  # fmt: skip


def test_every_public_kernel_has_a_naive_loop_test():
    here = pathlib.Path(__file__).parent
    text = "".join((here / f).read_text() for f in
                   ("test_kernels_reference.py", "test_kernels_reference_layers.py"))  # fmt: skip
    used = set(re.findall(r"\bK\.(\w+)", text))
    assert set(K.__all__) - used == set()
