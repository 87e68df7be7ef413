"""shardlax.parallelize: plans applied to models people write with plain nnx.

References are the same models, unparallelized, on one device. Meshes are
Auto (GSPMD joins the twins' shard_maps in the model's own code, e.g. its
cross-entropy over vocabulary-split logits).
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
from shardlax import Colwise, Replicate, Rowwise, VocabParallel, parallelize
from tests import utils
from tests.models import decoder, mlp, vit

MESHES = [(1, 1, 2), (1, 1, 4), (2, 1, 2), (1, 2, 2)]
#: heads divisible by every model size above
SIZES = dict(num_heads=8, num_kv_heads=4, head_dim=2, dim=16, hidden=32, num_layers=1)

EINSUM_PLAN = {
    "embedder": VocabParallel(),
    "layers.*.attn.q_einsum": Colwise(dim=1),  # (D, N, H): heads
    "layers.*.attn.kv_einsum": Colwise(dim=2),  # (C, D, K, H): kv heads, each of k and v
    "layers.*.attn.attn_vec_einsum": Rowwise(dim=0),  # (N, H, D)
    "layers.*.mlp.gating_einsum": Colwise(dim=2),  # (G, D, F)
    "layers.*.mlp.linear": Rowwise(),  # (F, D): the only contracted dim
    "layers.*.pre_attention_norm": Replicate(),
}


#: nnx.MultiHeadAttention's LinearGeneral projections: heads over the model axis
VIT_ATTENTION_PLAN = {
    "blocks.*.attn.query": Colwise(dim=1),  # kernel (D, N, H): heads
    "blocks.*.attn.key": Colwise(dim=1),
    "blocks.*.attn.value": Colwise(dim=1),
    "blocks.*.attn.out": Rowwise(dim=0),  # kernel (N, H, D)
    "blocks.*.fc1": Colwise(),
    "blocks.*.fc2": Rowwise(),
}


def _mesh(shape):
    d, f, m = shape
    return utils.mesh(data=d, fsdp=f, model=m, axis_types="auto")


def _batch(mesh, batch):
    spec = P(tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None)
    return jax.device_put(batch, NamedSharding(mesh, spec))


def _pure(state):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _value_and_grad(model, loss_fn):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch))(state)

    return f, state


def _reference(model, loss_fn, batch):
    # jitted: one compile instead of one dispatch per op
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, batch)
    return float(loss), _pure(nnx.state(grads, nnx.Param))


def _assert_tree_close(got, want):
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        utils.assert_close(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("shape", MESHES)
def test_einsum_decoder_forward_and_gradients(shape):
    mesh = _mesh(shape)
    batch = decoder.make_batch(jax.random.key(1), 4)
    want_loss, want_grads = _reference(decoder.make(0, **SIZES), decoder.loss_fn, batch)
    model = parallelize(decoder.make(0, **SIZES), EINSUM_PLAN, mesh=mesh)
    # same values and global shapes as the unparallelized model (the checkpoint layout)
    _assert_tree_close(
        _pure(nnx.state(model, nnx.Param)), _pure(nnx.state(decoder.make(0, **SIZES), nnx.Param))
    )
    q = model.layers[0].attn.q_einsum
    assert isinstance(q, shardlax.nn.ParallelEinsum) and q.kernel.shape == (16, 8, 2)
    utils.assert_sharding(q.kernel[...], mesh, P(None, "model", None))
    f, state = _value_and_grad(model, decoder.loss_fn)
    loss, grads = f(state, _batch(mesh, batch))
    utils.assert_close(loss, want_loss)
    _assert_tree_close(_pure(grads), want_grads)
    if shape == (2, 1, 2):
        _check_decoder_collectives(f, state, _batch(mesh, batch), mesh)


def _check_decoder_collectives(f, state, batch, mesh):
    """One dx all-reduce per shared input; nothing parameter-sized resharded by GSPMD."""
    layers = SIZES["num_layers"]
    report = shardlax.audit.collectives(f, state, batch, mesh=mesh)
    # forward: the embedding sum, and per layer the two row-like sums
    assert _model_reduces(report, backward=False) == 1 + 2 * layers
    # backward: dx of attend, and per layer ONE for q+kv (they read the same
    # normed activation) and ONE for gate/up: 2 per layer, not 3
    assert _model_reduces(report, backward=True) == 1 + 2 * layers
    assert {c.kind for c in report} == {"all-reduce"}, report
    # what GSPMD adds between the twins is per-token softmax statistics, never
    # a parameter or a whole activation
    glue = [c for c in report if "shard_map" not in c.op_name and c.axes == ("model",)]
    tokens = batch["inputs"].shape[0] // mesh.shape["data"] * decoder.SEQ
    assert glue and all(c.bytes <= 4 * tokens * c.operands for c in glue), glue


def _model_reduces(report, backward):
    """Operands of the model-axis all-reduces written in a twin's shard_map."""
    rows = report.where("all-reduce", ("model",))
    rows = [c for c in rows if "shard_map" in c.op_name]
    return sum(c.operands for c in rows if ("transpose(" in c.op_name) == backward)


class FusedAttention(nnx.Module):
    """Llama attention with a fused [k | v] projection (the model unpacks the parts)."""

    def __init__(self, dim, heads, kv_heads, head_dim, *, split, rngs):
        self.heads, self.kv_heads, self.head_dim, self.split = heads, kv_heads, head_dim, split
        self.q_proj = nnx.Linear(dim, heads * head_dim, use_bias=False, rngs=rngs)
        self.kv_proj = nnx.Linear(dim, 2 * kv_heads * head_dim, rngs=rngs)
        self.o_proj = nnx.Linear(heads * head_dim, dim, use_bias=False, rngs=rngs)
        self.gate_up = nnx.Linear(dim, 2 * 24, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(24, dim, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        kv = self.kv_proj(x)
        k, v = jnp.split(kv, 2, axis=-1) if self.split else kv
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        out = decoder.gqa(q, k, v).reshape(b, t, self.heads * self.head_dim)
        x = x + self.o_proj(out)
        gu = self.gate_up(x)
        gate, up = jnp.split(gu, 2, axis=-1) if self.split else gu
        return x + self.down(nnx.silu(gate) * up)


FUSED_PLAN = {
    "q_proj": Colwise(),
    "kv_proj": Colwise(parts=2),
    "o_proj": Rowwise(),
    "gate_up": Colwise(parts=2),
    "down": Rowwise(),
}


def _fused(split):
    return FusedAttention(16, 8, 4, 2, split=split, rngs=nnx.Rngs(3))


def _fused_loss(model, x):
    return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 1, 2), (1, 2, 2)])
def test_fused_parts_forward_gradients_and_one_dx_reduce(shape):
    """(1, 2, 2): the twins also FSDP-shard their parameters (parallelize(fsdp_axis=))."""
    mesh = _mesh(shape)
    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    want_loss, want_grads = _reference(_fused(True), _fused_loss, x)
    fsdp = dict(fsdp_axis="fsdp") if shape[1] > 1 else {}
    model = parallelize(_fused(False), FUSED_PLAN, mesh=mesh, **fsdp)
    assert model.kv_proj.kernel.shape == (16, 16) and model.kv_proj.out_features == 16
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        return jax.value_and_grad(lambda s, x: _fused_loss(nnx.merge(graphdef, s), x), (0, 1))(
            state, x
        )

    xs = _batch(mesh, x)
    loss, (grads, _) = f(state, xs)
    utils.assert_close(loss, want_loss)
    _assert_tree_close(_pure(grads), want_grads)
    report = shardlax.audit.collectives(f, state, xs, mesh=mesh)
    # dx: one all-reduce for q + kv (same x), one for gate_up: 2, not 3
    assert _model_reduces(report, backward=True) == 2
    assert _model_reduces(report, backward=False) == 2  # o_proj, down
    # the fused kernels (and kv's bias) are gathered forward, their gradients
    # reduce-scattered backward: written in kernels.fused_column_matmul
    gathers = report.where("all-gather", ("model",))
    assert sum(c.operands for c in gathers) == 3, gathers
    assert sum(c.operands for c in report.where("reduce-scatter", ("model",))) == 3


def test_fused_parts_refuse_jnp_split():
    mesh = _mesh((1, 1, 2))
    model = parallelize(_fused(True), FUSED_PLAN, mesh=mesh)
    with pytest.raises(TypeError, match=r"returns its 2 parts already split.*Unpack it"):
        model(jnp.ones((2, 6, 16)))


@pytest.mark.standard_dtype_promotion
def test_einsum_decoder_trains_like_one_device():
    """3 AdamW steps (plain optax on global arrays under jax.jit) equal one device."""
    mesh = _mesh((2, 1, 2))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    batches = [decoder.make_batch(jax.random.key(i), 4) for i in range(3)]

    ref = decoder.make(0, **SIZES)
    opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)

    @nnx.jit
    def ref_step(ref, opt, b):
        loss, grads = nnx.value_and_grad(decoder.loss_fn)(ref, b)
        opt.update(ref, grads)
        return loss

    ref_losses = [float(ref_step(ref, opt, b)) for b in batches]

    model = parallelize(decoder.make(0, **SIZES), EINSUM_PLAN, mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            return decoder.loss_fn(nnx.merge(graphdef, p, rest), batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return loss, optax.apply_updates(params, updates), opt_state

    losses = []
    for b in batches:
        loss, params, opt_state = step(params, opt_state, _batch(mesh, b))
        losses.append(float(loss))
    utils.assert_close(np.array(losses), np.array(ref_losses))
    _assert_tree_close(_pure(params), _pure(nnx.state(ref, nnx.Param)))
    q = nnx.merge(graphdef, params, rest).layers[0].attn.q_einsum.kernel[...]
    utils.assert_sharding(q, mesh, P(None, "model", None))  # the update kept the layout


@pytest.mark.parametrize(
    "mod, plan, shape",
    [
        (mlp, {"l1": Colwise(), "l2": Rowwise()}, (1, 2, 2)),
        (vit, {"blocks.*.fc1": Colwise(), "blocks.*.fc2": Rowwise()}, (2, 1, 2)),
        (vit, VIT_ATTENTION_PLAN, (1, 1, 2)),
    ],
    ids=["mlp", "vit", "vit_attention"],
)
def test_mlp_and_vit(mod, plan, shape):
    mesh = _mesh(shape)
    if True:
        batch = mod.make_batch(jax.random.key(2), 4)
        want_loss, want_grads = _reference(mod.make(0), mod.loss_fn, batch)
        model = parallelize(mod.make(0), plan, mesh=mesh)
        f, state = _value_and_grad(model, mod.loss_fn)
        loss, grads = f(state, _batch(mesh, batch))
        utils.assert_close(loss, want_loss, err_msg=mod.__name__)
        _assert_tree_close(_pure(grads.filter(nnx.Param)), want_grads)


# ------------------------------------------------------------------------- errors


def test_errors_name_the_path():
    mesh = _mesh((1, 1, 4))

    def model():
        return decoder.make(0)  # 2 kv heads

    with pytest.raises(ValueError, match=r"pattern 'layers\.\*\.attn\.q' matches no submodule"):
        parallelize(model(), {"layers.*.attn.q": Colwise()}, mesh=mesh)
    with pytest.raises(ValueError, match=r"'layers\.0\.attn\.kv_einsum'.*4 does not divide 2"):
        parallelize(model(), {"layers.*.attn.kv_einsum": Colwise(dim=2)}, mesh=mesh)
    with pytest.raises(
        ValueError,
        match=r"'embedder'.*Colwise fits nnx\.Linear, nnx\.LinearGeneral or nnx\.Einsum, not Embed",
    ):
        parallelize(model(), {"embedder": Colwise()}, mesh=mesh)
    with pytest.raises(ValueError, match=r"'final_norm'.*fits nnx\.Embed, not RMSNorm"):
        parallelize(model(), {"final_norm": VocabParallel()}, mesh=mesh)
    with pytest.raises(ValueError, match=r"Colwise\(\) on 'BTD,DNH->BTNH'.*choose one"):
        parallelize(model(), {"layers.*.attn.q_einsum": Colwise()}, mesh=mesh)
    with pytest.raises(ValueError, match=r"Rowwise\(dim=2\) on 'BTNH,NHD->BTD'.*not a contracted"):
        parallelize(model(), {"layers.*.attn.attn_vec_einsum": Rowwise(dim=2)}, mesh=mesh)
    with pytest.raises(ValueError, match=r"matched by two plan patterns"):
        parallelize(model(), {"embedder": VocabParallel(), "embed*": VocabParallel()}, mesh=mesh)
    with pytest.raises(TypeError, match=r"is not a style"):
        parallelize(model(), {"embedder": "vocab"}, mesh=mesh)
    with pytest.raises(ValueError, match=r"Colwise\(parts=2\) is for a fused nnx\.Linear"):
        parallelize(model(), {"layers.*.mlp.gating_einsum": Colwise(parts=2, dim=2)}, mesh=mesh)
    with pytest.raises(ValueError, match=r"Colwise\(dim=0\) on an nnx\.Linear kernel"):
        parallelize(mlp.make(0), {"l1": Colwise(dim=0)}, mesh=mesh)


def test_einsum_with_ellipses():
    """Equations with `...` (as flax writes them) take the same plans, values and gradients."""
    mesh = _mesh((1, 1, 2))

    class Proj(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Einsum("...D,DNH->...NH", (16, 8, 2), (8, 2), rngs=rngs)
            self.down = nnx.Einsum("...NH,NHD->...D", (8, 2, 16), (16,), rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    def loss_fn(m, x):
        return jnp.mean(m(x) ** 2)

    x = jax.random.normal(jax.random.key(0), (4, 3, 16))
    want_l, want_g = _reference(Proj(nnx.Rngs(0)), loss_fn, x)
    model = parallelize(
        Proj(nnx.Rngs(0)), {"up": Colwise(dim=1), "down": Rowwise(dim=0)}, mesh=mesh
    )
    assert model.up.output_spec(ndim=3) == P(None, None, "model", None)
    f, state = _value_and_grad(model, loss_fn)
    got_l, got_g = f(state, _batch(mesh, x))
    utils.assert_close(got_l, want_l)
    _assert_tree_close(_pure(nnx.state(got_g, nnx.Param)), want_g)


def test_linear_general_twin_errors():
    mesh = _mesh((1, 1, 2))

    class Lg(nnx.Module):
        def __init__(self, **kw):
            self.proj = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0), **kw)

    with pytest.raises(ValueError, match=r"'proj'.*LinearGeneral\(axis=\(1,\).*negative axes"):
        parallelize(Lg(axis=1), {"proj": Colwise(dim=1)}, mesh=mesh)
    with pytest.raises(ValueError, match=r"'proj'.*custom dot_general has no tensor-parallel"):
        parallelize(Lg(dot_general=lambda *a, **k: None), {"proj": Colwise(dim=1)}, mesh=mesh)
    with pytest.raises(ValueError, match=r"'proj'.*Colwise\(\) on '...a,abc->...bc'.*choose one"):
        parallelize(Lg(), {"proj": Colwise()}, mesh=mesh)


def test_linear_general_twin_refuses_an_fsdp_axis():
    class Lg(nnx.Module):
        def __init__(self):
            self.proj = nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))

    with pytest.raises(
        ValueError,
        match=r"'proj'.*the nnx\.LinearGeneral twin \(ParallelEinsum\) does not split its kernel "
        r"over an fsdp axis.*Pass fsdp_axis=None",
    ):
        parallelize(Lg(), {"proj": Colwise(dim=1)}, mesh=_mesh((1, 2, 2)), fsdp_axis="fsdp")
