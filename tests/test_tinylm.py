"""TinyLM: the loss and gradients of a train step are the same on every mesh, equal a plain
jnp transformer, and the compiled step holds exactly the declared collectives."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shardlax import audit
from shardlax.models import TinyLM, TinyLMConfig, copy_params
from tests import utils
from tests.test_attention import reference_attention

#: The meshes of the issue; each is compared with the single-device model.
MESHES = [(2, 2, 2), (1, 1, 8), (8, 1, 1), (1, 8, 1), (2, 1, 4)]
CFG = TinyLMConfig(vocab=60, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=64, seq_len=16)
B, S = 8, 16


def _batch(cfg):
    k = jax.random.split(jax.random.key(123), 2)
    return (jax.random.randint(k[0], (B, S), 0, cfg.vocab),
            jax.random.randint(k[1], (B, S), 0, cfg.vocab))  # fmt: skip


def compiled_step(model, tokens, targets, dropout_key=None):
    """Loss and gradients of `model.loss`, compiled once, and the program's collectives."""
    graphdef, state = nnx.split(model)

    def step(state, x, y):
        m = nnx.merge(graphdef, state)
        return nnx.value_and_grad(lambda m: m.loss(x, y, dropout_key=dropout_key))(m)

    compiled = jax.jit(step).lower(state, tokens, targets).compile()
    loss, grads = compiled(state, tokens, targets)
    report = audit.parse_hlo(compiled.as_text(), model.mesh)
    return float(loss), nnx.to_pure_dict(grads), report


@functools.cache
def single_device(cfg=CFG, dropout=False):
    model = TinyLM(cfg, mesh=utils.mesh(1, 1, 1), rngs=nnx.Rngs(0))
    key = jax.random.key(9) if dropout else None
    return model, compiled_step(model, *_batch(cfg), dropout_key=key)


# ------------------------------------------------------------- plain jnp reference


def reference_loss(params, tokens, targets, cfg):
    """The same transformer written plainly on full arrays (no shardlax code)."""

    def rms(x, scale):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale[None, None]

    table = params["embed"]["embedding"]
    x = table[tokens]
    blocks = params["blocks"]
    for i in range(cfg.n_layers):
        p = jax.tree.map(lambda a, i=i: a[i], blocks)
        a = p["attn"]
        h = rms(x, p["attn_norm"]["scale"])
        x = x + reference_attention(
            h, a["q_proj"]["kernel"], a["k_proj"]["kernel"], a["v_proj"]["kernel"],
            a["o_proj"]["kernel"], None, heads=cfg.n_heads, kv_heads=cfg.n_kv_heads or cfg.n_heads,
        )  # fmt: skip
        h = rms(x, p["mlp_norm"]["scale"])
        mlp = p["mlp"]
        g = h @ mlp["gate"]["kernel"]
        x = x + (jax.nn.sigmoid(g) * g * (h @ mlp["up"]["kernel"])) @ mlp["down"]["kernel"]
    x = rms(x, params["final_norm"]["scale"])
    logits = (x @ table.T)[..., : cfg.vocab]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def test_single_device_equals_plain_reference():
    model, (loss, grads, _) = single_device()
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), nnx.to_pure_dict(nnx.state(model)))
    tokens, targets = _batch(CFG)
    ref = jax.jit(jax.value_and_grad(reference_loss), static_argnums=3)
    ref_loss, ref_grads = ref(params, tokens, targets, CFG)
    utils.assert_close(loss, ref_loss)
    jax.tree.map(lambda g, r: utils.assert_close(g, r), grads, ref_grads)


# ------------------------------------------------------------------- every mesh


def _check_against_single_device(mesh_shape, cfg, *, dropout=False):
    mesh = utils.mesh(*mesh_shape)
    model = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    single, (ref_loss, ref_grads, _) = single_device(cfg, dropout)
    for ours, theirs in zip(
        jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))),
        jax.tree.leaves(nnx.to_pure_dict(nnx.state(single))),
        strict=True,
    ):  # same initial values on every mesh
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    tokens, targets = _batch(cfg)
    key = jax.random.key(9) if dropout else None
    loss, grads, report = compiled_step(model, tokens, targets, dropout_key=key)
    utils.assert_close(loss, ref_loss, err_msg="loss")
    jax.tree.map(lambda g, r: utils.assert_close(g, r, err_msg="grad"), grads, ref_grads)

    comparison = audit.compare(model.declared_collectives((B, S), grad=True), report)
    assert comparison.ok, comparison.table()
    # the logits are never gathered: nothing over 'model' is wider than a hidden activation
    local_tokens = B // (mesh.shape["data"] * mesh.shape["fsdp"]) * S
    widest = max((c.bytes for c in report.where(axes=("model",))), default=0)
    assert widest <= local_tokens * cfg.d_model * 4, report.table()
    return model, report


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_train_step_equals_single_device(mesh_shape):
    _check_against_single_device(mesh_shape, CFG)


SP_CFG = TinyLMConfig(
    vocab=60, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64, seq_len=16,
    sequence_parallel=True, tie_embeddings=False, dropout=0.2, remat=True,
)  # fmt: skip


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (2, 1, 4)], ids=str)
def test_sequence_parallel_gqa_untied_dropout_remat(mesh_shape):
    """SP + grouped-query heads + own head + remat + dropout: still the single-device step.

    Dropout masks depend on global positions only, so even the dropped units agree.
    """
    _, report = _check_against_single_device(mesh_shape, SP_CFG, dropout=True)
    model_kinds = report.where(axes=("model",)).kinds()
    assert model_kinds["reduce-scatter"] > 0 and model_kinds["all-gather"] > 0


@pytest.mark.parametrize("remat", [False, True])
def test_fsdp_parameters_are_gathered_twice_per_step(remat):
    """Each FSDP parameter of a block is all-gathered exactly twice per step, with remat too
    (forward, then the recomputation, whose gathered value the backward reuses: not a third
    re-gather), and the step equals one device with the compiled collectives as declared."""
    cfg = TinyLMConfig(vocab=60, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, d_ff=64,
                       seq_len=16, remat=remat)  # fmt: skip
    model, report = _check_against_single_device((1, 4, 2), cfg)
    per_block = [
        p for p in jax.tree.leaves(nnx.state(model.blocks, nnx.Param))
        if "fsdp" in jax.tree.leaves(tuple(p.sharding.spec))
    ]  # fmt: skip
    in_loop = [c for c in report.where(axes=("fsdp",)) if c.kind == "all-gather" and c.in_loop]
    assert {c.trips for c in in_loop} == {cfg.n_layers}
    if remat:
        assert len(in_loop) == 2 * len(per_block), report.table()
    else:  # a parameter whose value the backward does not need is not re-gathered
        assert len(per_block) < len(in_loop) <= 2 * len(per_block), report.table()


def test_copy_params_between_meshes():
    single, (ref_loss, _, _) = single_device()
    model = TinyLM(CFG, mesh=utils.mesh(2, 1, 4), rngs=nnx.Rngs(1))  # other initial values
    copy_params(single, model)
    assert model.embed.embedding[...].sharding.spec == model.embed.embedding_spec
    loss = nnx.jit(lambda m, x, y: m.loss(x, y))(model, *_batch(CFG))
    utils.assert_close(loss, ref_loss)


def test_tinylm_errors():
    mesh = utils.mesh(1, 1, 8)
    msg = (
        r"TinyLM\(vocab=60, vocab_multiple=4\): the padded vocabulary 60 cannot be split over "
        r"mesh axis 'model' \(size 8\): 8 does not divide 60. Set vocab_multiple to a multiple of 8"
    )
    with pytest.raises(ValueError, match=msg):
        TinyLM(TinyLMConfig(vocab=60, vocab_multiple=4, n_heads=8), mesh=mesh, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ParallelAttention\(num_heads=4\) cannot be split"):
        TinyLM(TinyLMConfig(n_heads=4), mesh=mesh, rngs=nnx.Rngs(0))
    model = TinyLM(CFG, mesh=utils.mesh(1, 1, 1), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(
        TypeError, match=r"TinyLM.loss: tokens must be integer token ids, got float32"
    ):
        model.loss(tokens.astype(jnp.float32), tokens)
    with pytest.raises(ValueError, match=r"TinyLM.loss: targets.shape=\(2, 4\) must equal"):
        model.loss(tokens, tokens[:, :4])
    msg = r"TinyLM: tokens.shape\[1\]=32 is longer than TinyLMConfig\(seq_len=16\)"
    with pytest.raises(ValueError, match=msg):
        model.loss(jnp.zeros((2, 32), jnp.int32), jnp.zeros((2, 32), jnp.int32))
    sp_model = TinyLM(SP_CFG, mesh=utils.mesh(1, 1, 4), rngs=nnx.Rngs(0))
    msg = r"ParallelEmbed\(sequence_parallel=True\): inputs.shape\[1\]=6 \(the sequence\)"
    with pytest.raises(ValueError, match=msg + " cannot be sharded"):
        sp_model.loss(jnp.zeros((2, 6), jnp.int32), jnp.zeros((2, 6), jnp.int32))
