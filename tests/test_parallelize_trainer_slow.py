"""Parallelized corpus models train through `shardlax.Trainer` exactly as on one device.

Heavy (every corpus model under several strategies and meshes): marked slow
(`pytest -m slow`). 3 AdamW steps with active clipping: per-step losses, final
parameters and optimizer step counts against the unparallelized model trained
with plain nnx + optax on one device; one compile of the step.

Plans: the Gemma-style decoder (`nnx.Einsum` heads) with its embedder whole
(its tied `attend` feeds a plain cross-entropy, which needs whole logits), the
Llama-style decoder (fused kv and gate/up via `Colwise(parts=2)`, head counts
read from the arrays), the ViT's MLPs (and its nnx.MultiHeadAttention's
LinearGeneral projections), the plain MLP.
"""

from __future__ import annotations

import pytest

from shardlax import Colwise, Rowwise, parallelize
from tests import utils
from tests.models import batches, decoder, llama, mlp, one_device_reference, vit
from tests.test_parallelize_trainer import (
    BATCH,
    LLAMA_PLAN,
    MAX_NORM,
    MLP_PLAN,
    N_STEPS,
    assert_like_reference,
    train,
    tx,
    wrap_blocks,
)

pytestmark = [pytest.mark.slow, pytest.mark.standard_dtype_promotion]

SIZES = dict(num_heads=8, num_kv_heads=4, head_dim=2, dim=16, hidden=32, num_layers=1)
EINSUM_PLAN = {
    "layers.*.attn.q_einsum": Colwise(dim=1),
    "layers.*.attn.kv_einsum": Colwise(dim=2),
    "layers.*.attn.attn_vec_einsum": Rowwise(dim=0),
    "layers.*.mlp.gating_einsum": Colwise(dim=2),
    "layers.*.mlp.linear": Rowwise(),
}
MODELS = {
    "decoder": (lambda: decoder.make(0, **SIZES), decoder, EINSUM_PLAN),
    "llama": (lambda: llama.make(0, num_layers=1), llama, LLAMA_PLAN),
    "vit": (vit.make, vit, {"blocks.*.fc1": Colwise(), "blocks.*.fc2": Rowwise()}),
    "mlp": (mlp.make, mlp, MLP_PLAN),
    # nnx.MultiHeadAttention's LinearGeneral projections split over the heads too
    "vit_attention": (
        vit.make,
        vit,
        {
            "blocks.*.attn.query": Colwise(dim=1),
            "blocks.*.attn.key": Colwise(dim=1),
            "blocks.*.attn.value": Colwise(dim=1),
            "blocks.*.attn.out": Rowwise(dim=0),
            "blocks.*.fc1": Colwise(),
            "blocks.*.fc2": Rowwise(),
        },
    ),
}
RUNS = [
    ("decoder", "dp", (2, 1, 2)),
    ("decoder", "zero1", (1, 2, 2)),
    ("decoder", "zero2", (2, 1, 2)),
    ("llama", "dp", (1, 2, 2)),
    ("llama", "zero1", (2, 1, 2)),
    ("llama", "zero2", (1, 2, 2)),
    ("vit", "zero1", (1, 2, 2)),
    ("vit", "zero2", (2, 1, 2)),
    ("vit_attention", "zero2", (2, 1, 2)),
    ("vit_attention", "dp", (1, 1, 2)),
    ("mlp", "dp", (2, 1, 2)),
    ("mlp", "zero1", (2, 1, 2)),
]

_REFS: dict = {}


def reference(name):
    if name not in _REFS:
        ctor, mod, _ = MODELS[name]
        data = batches(mod.make_batch, BATCH, N_STEPS)
        _REFS[name] = one_device_reference(ctor, mod.loss_fn, tx(), data), data
    return _REFS[name]


@pytest.mark.parametrize(("name", "strategy", "shape"), RUNS, ids=str)
def test_parallelized_corpus_trains_like_one_device(name, strategy, shape):
    mesh = utils.mesh(*shape)
    ref, data = reference(name)
    assert min(ref.grad_norms) > MAX_NORM, ref.grad_norms
    ctor, mod, plan = MODELS[name]
    model = parallelize(ctor(), plan, mesh=mesh)
    trainer, state, losses, compiles = train(model, mod.loss_fn, mesh, strategy, data)
    assert compiles == 1, f"the step compiled {compiles} times in {N_STEPS} steps"
    assert_like_reference(trainer, state, losses, ref, f"{name} {strategy} {shape}")


def test_vit_fsdp_tp_trains_like_one_device():
    """parallelize(fsdp_axis='fsdp'): the linear twins also split over fsdp, fsdp+tp."""
    mesh = utils.mesh(1, 2, 2)
    ref, data = reference("vit")
    ctor, mod, plan = MODELS["vit"]
    model = parallelize(ctor(), plan, mesh=mesh, fsdp_axis="fsdp")
    trainer, state, losses, compiles = train(model, mod.loss_fn, mesh, "fsdp+tp", data)
    assert compiles == 1
    assert_like_reference(trainer, state, losses, ref, "vit fsdp+tp")


UNIT_RUNS = [
    ("decoder", "fsdp+tp", (1, 2, 2)),
    ("vit_attention", "fsdp+tp", (2, 2, 2)),
    ("llama", "fsdp+tp", (1, 4, 2)),
    ("llama", "zero2", (2, 2, 2)),
    ("decoder", "dp", (2, 1, 2)),
]


@pytest.mark.parametrize(("name", "strategy", "shape"), UNIT_RUNS, ids=str)
def test_parallelized_blocks_in_fully_shard_units_train_like_one_device(name, strategy, shape):
    """torchtitan's order: the TP plan, then a fully_shard unit per block; fsdp+tp, and the
    strategies that keep the units' shards and split the optimizer state further."""
    mesh = utils.mesh(*shape)
    ref, data = reference(name)
    ctor, mod, plan = MODELS[name]
    model = parallelize(ctor(), plan, mesh=mesh)
    model = wrap_blocks(model, mesh, "blocks" if name.startswith("vit") else "layers")
    trainer, state, losses, compiles = train(model, mod.loss_fn, mesh, strategy, data)
    assert compiles == 1, f"the step compiled {compiles} times in {N_STEPS} steps"
    assert_like_reference(trainer, state, losses, ref, f"{name} units {strategy} {shape}")
