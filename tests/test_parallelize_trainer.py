"""A `parallelize`d model inside `shardlax.Trainer`, where the twins run as per-device code.

References are the unparallelized models trained with plain nnx + optax on one
device (`tests.models.one_device_reference`). The whole corpus matrix (decoder,
Llama-style decoder, ViT, MLP under dp / zero1 / zero2 / fsdp+tp) is in
tests/test_parallelize_trainer_slow.py; here: one small model end to end with
its audited collectives, and every error of the manual-mode checks
(`shardlax.parallelize.call_local`) and of parallelize + fully_shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shardlax
from shardlax import Colwise, Rowwise, VocabParallel, parallelize
from shardlax.parallelize import call_local
from tests import utils
from tests.models import batches, decoder, host, llama, logical, mlp, one_device_reference

pytestmark = pytest.mark.standard_dtype_promotion

N_STEPS, BATCH, MAX_NORM = 3, 8, 1e-3
MLP_PLAN = {"l1": Colwise(), "l2": Rowwise()}
LLAMA_PLAN = {
    "layers.*.attn.q_proj": Colwise(),
    "layers.*.attn.kv_proj": Colwise(parts=2),
    "layers.*.attn.o_proj": Rowwise(),
    "layers.*.mlp.gate_up_proj": Colwise(parts=2),
    "layers.*.mlp.down_proj": Rowwise(),
}


def tx():
    return optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.adamw(1e-2, weight_decay=0.1))


def train(model, loss_fn, mesh, strategy, data):
    """(trainer, state, losses, compiles) after one step per batch."""
    trainer = shardlax.Trainer(model, tx(), loss_fn, mesh=mesh, strategy=strategy)
    state, losses = trainer.init(), []
    with utils.count_compiles("_step") as compiles:
        for batch in data:
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))
    return trainer, state, losses, compiles.count


def assert_like_reference(trainer, state, losses, ref, what):
    utils.assert_close(np.array(losses), np.array(ref.losses), err_msg=f"{what} losses")
    model = trainer.model(state)
    got, want = logical(nnx.state(model, nnx.Param)), logical(ref.params)
    assert list(got) == list(want), what
    for path, w in want.items():
        utils.assert_close(got[path], w, err_msg=f"{what} {path}")
    # the optimizer state: optax's step count advanced as on one device
    counts = [x for x in jax.tree.leaves(host(state.opt_state)) if x.dtype == np.int32]
    assert counts and all(int(c) == N_STEPS for c in counts), counts


def test_mlp_trains_like_one_device_with_the_declared_collectives():
    """(1, 2, 2): 3 AdamW steps (active clipping) == one device, 1 compile, declared == HLO."""
    mesh = utils.mesh(1, 2, 2)
    data = batches(mlp.make_batch, BATCH, N_STEPS)
    ref = one_device_reference(mlp.make, mlp.loss_fn, tx(), data)
    assert min(ref.grad_norms) > MAX_NORM, ref.grad_norms
    model = parallelize(mlp.make(), MLP_PLAN, mesh=mesh)
    # the twins' own declarations, as the Trainer's step calls them: l1 reads the
    # data (no input gradient), l2 reads l1's output
    declared_model = model.l1.declared_collectives(
        (BATCH, mlp.IN), grad=True, input_grad=False
    ) + model.l2.declared_collectives((BATCH, mlp.HIDDEN), grad=True, input_grad=True)
    trainer, state, losses, compiles = train(model, mlp.loss_fn, mesh, "zero2", data)
    assert compiles == 1, f"the step compiled {compiles} times in {N_STEPS} steps"
    assert_like_reference(trainer, state, losses, ref, "zero2")
    utils.assert_sharding(state.params["l1"]["kernel"], mesh, trainer.placements[1].spec)
    report = shardlax.audit.collectives(trainer.step, state, data[0])
    declared = trainer.declared_collectives(data[0], model_collectives=declared_model)
    cmp = shardlax.audit.compare(declared, report)
    assert cmp.ok, cmp.table()
    # the Rowwise output sum over 'model' forward: one all-reduce of [B/2, 3] f32
    rows = [c for c in report.where("all-reduce", ("model",)) if "transpose" not in c.op_name]
    assert [c.bytes for c in rows] == [BATCH // 2 * mlp.OUT * 4], report.table()


def test_parallelize_fsdp_axis_splits_the_linear_twins():
    mesh = utils.mesh(1, 2, 2)
    model = parallelize(llama.make(0, num_layers=1), LLAMA_PLAN, mesh=mesh, fsdp_axis="fsdp")
    attn = model.layers[0].attn
    utils.assert_sharding(attn.q_proj.kernel[...], mesh, jax.P("fsdp", "model"))
    utils.assert_sharding(attn.o_proj.kernel[...], mesh, jax.P("model", "fsdp"))
    plain = parallelize(llama.make(0, num_layers=1), LLAMA_PLAN, mesh=mesh)
    utils.assert_sharding(plain.layers[0].attn.q_proj.kernel[...], mesh, jax.P(None, "model"))
    want = llama.make(0, num_layers=1).layers[0].attn.q_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(attn.q_proj.kernel[...]), want)
    with pytest.raises(ValueError, match=r"at 'l1' .*4 does not divide 10.*fsdp_axis=None"):
        parallelize(mlp.make(), MLP_PLAN, mesh=mesh, fsdp_axis="fsdp")


# ------------------------------------------------------------ manual-mode checks


def _checked(loss_fn):
    def loss(model, batch):
        return call_local(loss_fn, model, batch)

    return loss


def _step(model, loss_fn, mesh, batch):
    trainer = shardlax.Trainer(model, optax.adamw(1e-2), loss_fn, mesh=mesh, strategy="dp")
    return trainer.step(trainer.init(), batch)


def test_reshape_with_a_global_head_count_names_the_twin():
    """decoder_linear reshapes q with `self.num_heads`: on local shards that fails, named."""
    mesh = utils.mesh(2, 1, 2)
    plan = {"layers.*.attn.q_proj": Colwise(), "layers.*.attn.o_proj": Rowwise()}
    model = parallelize(decoder.make_linear(0), plan, mesh=mesh)
    batch = decoder.make_batch(jax.random.key(0), 4)
    with pytest.raises(
        TypeError,
        match=r"'layers\.0\.attn\.q_proj', 'layers\.1\.attn\.q_proj' \(ColumnParallelLinear "
        r"output \[\.\.\., F\]\) are 8 per device, the global 16 split over mesh axis 'model' "
        r"\(size 2\)\. .*reshape\(b, t, -1, head_dim\).*cannot reshape array of shape "
        r"\(2, 8, 8\)",
    ):
        _step(model, _checked(decoder.loss_fn), mesh, batch)


def test_loss_over_vocabulary_split_logits_is_refused():
    """A plain cross-entropy of VocabParallel logits would be a per-device softmax."""
    mesh = utils.mesh(2, 1, 2)
    model = parallelize(decoder.make(0, num_layers=1), {"embedder": VocabParallel()}, mesh=mesh)
    batch = decoder.make_batch(jax.random.key(0), 4)
    with pytest.raises(
        ValueError,
        match=r"the loss varies over mesh axis 'model' \(size 2\).*'embedder' \(ParallelEmbed"
        r"\.attend logits \[\.\.\., V\]\) is 16 per device, the global 32 split over mesh axis "
        r"'model' \(size 2\)\. Fix: keep that layer whole \(Replicate\(\) it",
    ):
        _step(model, _checked(decoder.loss_fn), mesh, batch)


def test_errors_of_the_twins_pass_unchanged():
    mesh = utils.mesh(2, 1, 2)
    model = parallelize(decoder.make(0), {"embedder": VocabParallel()}, mesh=mesh)
    batch = decoder.make_batch(jax.random.key(0), 4)
    batch = {"inputs": batch["inputs"].astype(jnp.float32), "targets": batch["targets"]}
    with pytest.raises(TypeError, match=r"^ParallelEmbed: inputs must be integer token ids"):
        _step(model, _checked(decoder.loss_fn), mesh, batch)


def test_call_local_at_top_level_is_the_call():
    mesh = utils.mesh(1, 1, 2, axis_types="auto")
    model = parallelize(mlp.make(), MLP_PLAN, mesh=mesh)
    x = jnp.ones((2, mlp.IN))
    np.testing.assert_array_equal(np.asarray(call_local(lambda m, x: m(x), model, x)),
                                  np.asarray(model(x)))  # fmt: skip


# --------------------------------------------------------- parallelize + fully_shard


def test_parallelize_fsdp_axis_refuses_einsum_twins():
    mesh = utils.mesh(1, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"'layers\.0\.attn\.q_einsum'.*parallelize\(fsdp_axis='fsdp'\): the nnx\.Einsum "
        r"twin \(ParallelEinsum\) does not split its kernel over an fsdp axis.*Pass "
        r"fsdp_axis=None",
    ):
        parallelize(decoder.make(0), {"layers.*.attn.q_einsum": Colwise(dim=1)}, mesh=mesh,
                    fsdp_axis="fsdp")  # fmt: skip


def wrap_blocks(model, mesh, name="layers"):
    """FSDP2's pattern: every block a fully_shard unit (after parallelize, as torchtitan)."""
    blocks = getattr(model, name)
    for i, block in enumerate(blocks):
        blocks[i] = shardlax.fully_shard(block, mesh=mesh)
    return model


def test_fully_shard_after_parallelize_trains_like_one_device_as_declared():
    """Llama, TP plan then a unit per block, (2, 2, 2) fsdp+tp: 3 AdamW steps == one device;
    the unit stores the twins' kernels split over fsdp and model; declared == HLO."""
    mesh = utils.mesh(2, 2, 2)
    data = batches(llama.make_batch, BATCH, N_STEPS)
    ref = one_device_reference(lambda: llama.make(0, num_layers=2), llama.loss_fn, tx(), data)
    model = wrap_blocks(parallelize(llama.make(0, num_layers=2), LLAMA_PLAN, mesh=mesh), mesh)
    unit = model.layers[0]
    specs = dict(zip(unit.param_paths(), unit.fsdp_config.param_specs, strict=True))
    assert specs["attn.q_proj.kernel"] == jax.P("fsdp", "model"), specs
    assert specs["attn.o_proj.kernel"] == jax.P(("model", "fsdp"), None), specs
    assert specs["pre_ffw_norm.scale"] == jax.P("fsdp"), specs
    utils.assert_sharding(unit.attn.q_proj.kernel[...], mesh, jax.P("fsdp", "model"))
    trainer, state, losses, compiles = train(model, llama.loss_fn, mesh, "fsdp+tp", data)
    assert compiles == 1, f"the step compiled {compiles} times in {N_STEPS} steps"
    assert_like_reference(trainer, state, losses, ref, "llama units fsdp+tp")
    b, t = data[0]["inputs"].shape
    x = jax.ShapeDtypeStruct((b, t, 16), jnp.float32)
    # each unit declares its fsdp collectives (the twins' shards included) and the twins'
    # own, traced: kv_proj reads q_proj's input, so their dx is all-reduced once
    declared_model = [d for unit in model.layers for d in unit.declared_collectives(x)]
    by_hand = []
    for unit in model.layers:
        attn, mlp_ = unit.attn, unit.mlp
        by_hand += attn.q_proj.declared_collectives((b, t, 16), grad=True)
        by_hand += attn.kv_proj.declared_collectives((b, t, 16), grad=True, input_grad=False)
        by_hand += attn.o_proj.declared_collectives((b, t, 16), grad=True)
        by_hand += mlp_.gate_up_proj.declared_collectives((b, t, 16), grad=True)
        by_hand += mlp_.down_proj.declared_collectives((b, t, 32), grad=True)
    tp = [d for d in declared_model if d.axes == ("model",)]
    assert tp == [d for d in by_hand if d.axes == ("model",)], tp
    report = shardlax.audit.collectives(trainer.step, state, data[0])
    cmp = shardlax.audit.compare(
        trainer.declared_collectives(data[0], model_collectives=declared_model), report
    )
    assert cmp.ok, cmp.table()
    # each unit gathers its 7 parameters over fsdp forward, the 5 kernels again backward
    # (reshard_after_forward; the norms' scales too: their input gradient reads them)
    gathers = report.where("all-gather", ("fsdp",))
    assert len(gathers) == 2 * 7 + 2 * 3, report.table()


def test_parallelize_inside_a_unit_is_refused():
    mesh = utils.mesh(2, 2, 2)
    model = llama.make(0, num_layers=1)
    model.layers[0] = shardlax.fully_shard(model.layers[0], mesh=mesh)
    with pytest.raises(
        ValueError,
        match=r"'layers\.0\.attn\.q_proj' \(plan\['layers\.\*\.attn\.q_proj'\]\) "
        r"is inside the fully_shard unit 'layers\.0'.*Apply the plan first, then wrap",
    ):
        parallelize(model, {"layers.*.attn.q_proj": Colwise()}, mesh=mesh)


def test_unit_errors_for_twins_it_cannot_run():
    mesh = utils.mesh(1, 2, 2)
    sp = parallelize(mlp.make(), {"l1": Colwise(sequence_parallel=True)}, mesh=mesh)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear at 'l1' is sequence-parallel"):
        shardlax.fully_shard(sp, mesh=mesh)
    other = parallelize(mlp.make(), MLP_PLAN, mesh=utils.mesh(2, 1, 2))
    with pytest.raises(ValueError, match=r"ColumnParallelLinear at 'l1' was built with mesh"):
        shardlax.fully_shard(other, mesh=mesh)
    # a unit that ends in a column twin would return a model-split output
    half = shardlax.fully_shard(parallelize(mlp.make(), {"l1": Colwise()}, mesh=mesh).l1,
                                mesh=mesh)  # fmt: skip
    with pytest.raises(ValueError, match=r"varies over mesh axis 'model'.*gather_output=True"):
        nnx.jit(lambda m, x: m(x))(half, jnp.ones((4, mlp.IN)))


# --------------------------------------------------------- the first-step check

GQA_PLAN = {
    "layers.*.attn.q_einsum": Colwise(dim=1),
    "layers.*.attn.attn_vec_einsum": Rowwise(dim=0),
}  # kv_einsum left whole: local q heads meet every kv head


def test_code_that_mixes_a_split_dim_is_caught_at_the_first_step():
    """q heads split, kv heads not: on local shards the GQA grouping pairs q heads with the
    wrong kv heads (no shape error). The first step compares with the loss on global arrays."""
    mesh = utils.mesh(2, 1, 2, axis_types="auto")
    model = parallelize(decoder.make(0, num_layers=1), GQA_PLAN, mesh=mesh)
    batch = decoder.make_batch(jax.random.key(0), 4)
    trainer = shardlax.Trainer(model, optax.adamw(1e-2), decoder.loss_fn, mesh=mesh,
                               strategy="dp")  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"the first step's loss .* per-device shards of the tensor-parallel twins "
        r"\(layers\.0\.attn\.q_einsum.*differs from the same loss on global arrays.*"
        r"check_tensor_parallel=False",
    ):
        trainer.step(trainer.init(), batch)
    unchecked = shardlax.Trainer(model, optax.adamw(1e-2), decoder.loss_fn, mesh=mesh,
                                 strategy="dp", check_tensor_parallel=False)  # fmt: skip
    _, metrics = unchecked.step(unchecked.init(), batch)  # runs, and is wrong:
    want = decoder.loss_fn(decoder.make(0, num_layers=1), host(batch))
    assert abs(float(metrics["loss"]) - float(want)) > 1e-3


def test_the_first_step_check_passes_a_right_plan_and_runs_once():
    mesh = utils.mesh(2, 1, 2, axis_types="auto")
    plan = {**GQA_PLAN, "layers.*.attn.kv_einsum": Colwise(dim=2)}
    model = parallelize(decoder.make(0, num_layers=1), plan, mesh=mesh)
    data = [decoder.make_batch(jax.random.key(i), 4) for i in range(2)]
    trainer, _state, losses, compiles = train(model, decoder.loss_fn, mesh, "dp", data)
    assert trainer.step._checked and compiles == 1
    ref = [float(decoder.loss_fn(decoder.make(0, num_layers=1), host(data[0])))]
    utils.assert_close(np.array(losses[:1]), np.array(ref))


def test_unit_declarations_refuse_a_method_they_cannot_derive():
    """A unit that calls a VocabParallel twin's `attend` says to declare that layer by hand."""
    mesh = utils.mesh(1, 2, 2)

    class Head(nnx.Module):
        def __init__(self):
            self.embedder = nnx.Embed(8, 4, rngs=nnx.Rngs(0))

        def __call__(self, h):  # per-device code: the logits' sum over the whole vocabulary
            return shardlax.kernels.all_reduce(self.embedder.attend(h).sum(-1), "model")

    head = parallelize(Head(), {"embedder": VocabParallel()}, mesh=mesh)
    unit = shardlax.fully_shard(head, mesh=mesh)
    with pytest.raises(
        ValueError,
        match=r"FSDPModule\(Head\)\.declared_collectives: the unit calls ParallelEmbed\.attend, "
        r"whose collectives it cannot derive\. Pass regathered=",
    ):
        unit.declared_collectives(jax.ShapeDtypeStruct((4, 4), jnp.float32))
