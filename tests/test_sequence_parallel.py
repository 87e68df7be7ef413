"""Sequence parallelism: norms on 1/N of the tokens, TP's bytes, less activation memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shardlax
from shardlax import audit
from shardlax.models import TinyLM, TinyLMConfig
from tests import utils


def reference_rms_norm(x, scale, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale[None, None]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2), (1, 1, 8)], ids=str)
def test_rms_norm_matches_flax_and_reference(mesh_shape):
    mesh = utils.mesh(*mesh_shape)
    x = jax.random.normal(jax.random.key(0), (4, 8, 16))
    cot = jax.random.normal(jax.random.key(1), (4, 8, 16))
    flax_norm = nnx.RMSNorm(16, rngs=nnx.Rngs(0))
    scale = jax.random.normal(jax.random.key(2), (16,))
    for sp in (False, True):
        norm = shardlax.nn.RMSNorm(16, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=sp)
        np.testing.assert_array_equal(np.asarray(norm.scale[...]), np.asarray(flax_norm.scale[...]))
        utils.assert_close(nnx.jit(lambda m, x: m(x))(norm, x), flax_norm(x), err_msg="vs nnx")
        norm.scale[...] = jax.device_put(scale, norm.scale[...].sharding)
        y = nnx.jit(lambda m, x: m(x))(norm, x)
        utils.assert_sharding(y, mesh, norm.hidden_spec(3))
        grads, dx = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1)))(norm, x)
        ref = jax.grad(lambda x, s: jnp.sum(reference_rms_norm(x, s) * cot), argnums=(0, 1))
        rdx, rds = ref(x, scale)
        utils.assert_close(y, reference_rms_norm(x, scale))
        utils.assert_close(dx, rdx, err_msg="dx")
        utils.assert_close(grads["scale"][...], rds, err_msg="d scale")  # summed over all tokens


def test_sequence_parallel_same_bytes_less_memory():
    """Megatron-SP vs Megatron-TP on TinyLM, (1, 1, 8): an all-reduce is a reduce-scatter plus an
    all-gather, so the activation collectives move the same bytes; the activations between the
    blocks are stored 1/8 as large, so the step needs less temporary memory."""
    mesh = utils.mesh(1, 1, 8)
    tokens = jnp.zeros((8, 64), jnp.int32)
    measured = {}
    for sp in (False, True):
        cfg = TinyLMConfig(vocab=64, d_model=64, n_layers=2, n_heads=8, d_ff=128, seq_len=64,
                           sequence_parallel=sp)  # fmt: skip
        graphdef, state = nnx.split(TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(0)))

        def step(state, x, y, graphdef=graphdef):
            return nnx.value_and_grad(lambda m: m.loss(x, y))(nnx.merge(graphdef, state))

        compiled = jax.jit(step).lower(state, tokens, tokens).compile()
        report = audit.parse_hlo(compiled.as_text(), mesh).where(axes=("model",))
        # activation collectives: [B, S(/8), D] tensors (the loss's [B, S] scalars and the
        # norm scales' [D] gradients are smaller and counted apart)
        acts = [c for c in report if c.bytes >= 8 * 8 * 64 * 4]
        measured[sp] = (
            sum(c.wire_bytes for c in acts),
            {k: sum(c.operands for c in acts if c.kind == k) for k in {c.kind for c in acts}},
            compiled.memory_analysis().temp_size_in_bytes,
        )
    (tp_bytes, tp_kinds, tp_temp), (sp_bytes, sp_kinds, sp_temp) = measured[False], measured[True]
    assert tp_kinds == {"all-reduce": 6}  # embed 1, per block (in scan) 2 fwd + 2 bwd, head dx 1
    assert sp_kinds == {"all-gather": 6, "reduce-scatter": 6}
    assert sp_bytes == tp_bytes
    assert sp_temp < 0.85 * tp_temp, (sp_temp, tp_temp)


def test_rms_norm_errors():
    mesh = utils.mesh(1, 1, 4)
    norm = shardlax.nn.RMSNorm(16, mesh=mesh, rngs=nnx.Rngs(0), sequence_parallel=True)
    msg = (
        r"RMSNorm\(sequence_parallel=True\): inputs.shape\[1\]=6 \(the sequence\) cannot be "
        r"sharded over mesh axis 'model' \(size 4\): 4 does not divide 6"
    )
    with pytest.raises(ValueError, match=msg):
        norm(jnp.zeros((2, 6, 16)))
    with pytest.raises(ValueError, match=r"RMSNorm\(num_features=16\): inputs.shape\[-1\] is 8"):
        norm(jnp.zeros((2, 8, 8)))


def test_sequence_parallel_matmul_kernels():
    """The SP column/row kernels: x gathered over the sequence on entry, y scattered on exit."""
    mesh = utils.mesh(2, 1, 4)
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (4, 8, 16))
    w1, w2 = jax.random.normal(k[1], (16, 32)), jax.random.normal(k[2], (32, 16))
    b2, cot = jax.random.normal(k[3], (16,)), jax.random.normal(k[4], (4, 8, 16))
    hidden = jax.sharding.PartitionSpec("data", "model", None)
    specs = (hidden, P_(None, "model"), P_("model", None), P_(None))

    def body(x, w1, w2, b2):
        h = shardlax.kernels.sequence_parallel_column_matmul(x, w1)  # h: [B, S, F/4]
        return shardlax.kernels.sequence_parallel_row_matmul(jax.nn.relu(h), w2, b2)

    f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=hidden)
    args = [jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
            for a, s in zip((x, w1, w2, b2), specs, strict=True)]  # fmt: skip
    loss = lambda *a: jnp.sum(f(*a) * cot)
    ref = lambda x, w1, w2, b2: jnp.sum((jax.nn.relu(x @ w1) @ w2 + b2[None, None]) * cot)
    utils.assert_close(jax.jit(f)(*args), jax.nn.relu(x @ w1) @ w2 + b2[None, None])
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    for g, r in zip(grads, jax.grad(ref, argnums=(0, 1, 2, 3))(x, w1, w2, b2), strict=True):
        utils.assert_close(g, r)
    report = audit.collectives(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), *args, mesh=mesh)
    acts = [c for c in report.where(axes=("model",)) if c.bytes >= 8 * 8 * 16]  # activations
    assert {c.kind for c in acts} == {"all-gather", "reduce-scatter"}, report.table()
    assert sum(c.operands for c in acts) == 4  # x and dy gathered, y and dx scattered


P_ = jax.sharding.PartitionSpec
