"""shardlax.checkpoint: the logical layout moves between strategies and meshes, bitwise.

The reference of a restore is the state that was saved, read back to host
(numpy) in the logical layout; the reference of a resumed run is the same run
uninterrupted. Nothing is compared with the code under test's own output
except through those.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import shardlax
from shardlax import checkpoint, train
from tests import utils

pytestmark = pytest.mark.standard_dtype_promotion

D, F, OUT, HEAD, B = 8, 16, 8, 5, 16


class Net(nnx.Module):
    """Two linears (plain flax, or shardlax.nn split over fsdp/model) and a plain head.

    Both variants have the same nnx paths, shapes and dtypes, so one checkpoint
    fits either. The head's bias (5) pads under ZeRO; `noise` puts an RNG key
    and count into the non-parameter state.
    """

    def __init__(self, mesh=None, *, rngs: nnx.Rngs, hidden: int = F):
        if mesh is None:
            self.l1 = nnx.Linear(D, hidden, rngs=rngs)
            self.l2 = nnx.Linear(hidden, OUT, rngs=rngs)
        else:
            self.l1 = shardlax.nn.ColumnParallelLinear(D, hidden, mesh=mesh, rngs=rngs)
            self.l2 = shardlax.nn.RowParallelLinear(hidden, OUT, mesh=mesh, rngs=rngs)
        self.head = nnx.Linear(OUT, HEAD, rngs=rngs)
        self.noise = nnx.Rngs(3)

    def __call__(self, x):
        return self.head(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def make_batch(seed: int):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(kx, (B, D)), "y": jax.random.normal(ky, (B, HEAD))}


def adamw():
    return utils.adamw_clipped(0.1)


def trainer_for(strategy: str, shape, *, seed: int = 0, tx=None, hidden: int = F, **kw):
    mesh = utils.mesh(*shape)
    sharded = strategy.startswith("fsdp") or kw.pop("sharded", False)
    model = Net(mesh if sharded else None, rngs=nnx.Rngs(seed), hidden=hidden)
    return train.Trainer(model, tx or adamw(), loss_fn, mesh=mesh, strategy=strategy, **kw)


def host(tree) -> dict[str, np.ndarray]:
    """Every leaf on host by its path (PRNG keys as their key data)."""

    def get(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return {jax.tree_util.keystr(p): get(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: paths differ"
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (
            f"{what} {k}: {got[k].dtype}{got[k].shape} != {want[k].dtype}{want[k].shape}"
        )
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what} {k}")


def assert_laid_out(trainer, state) -> None:
    """`state` has the trainer's own layout: the shapes of init, the specs of state_specs."""
    abstract = jax.eval_shape(trainer.init)
    for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=True):
        assert (x.shape, x.dtype) == (a.shape, a.dtype)
    specs = jax.tree.leaves(trainer.state_specs(), is_leaf=lambda s: isinstance(s, jax.P))
    for x, spec in zip(jax.tree.leaves(state), specs, strict=True):
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            utils.assert_sharding(x, trainer.mesh, spec)


def trained(trainer, steps: int, first: int = 0):
    state = trainer.init()
    for seed in range(first, first + steps):
        state, _ = trainer.step(state, make_batch(seed))
    return state


#: (strategy, mesh, Trainer kwargs): 8 -> 4 -> 2 -> 1 devices and back, every strategy.
HOPS = [
    ("zero1", (4, 1, 1), {}),
    ("dp", (2, 1, 1), {}),
    ("fsdp", (1, 1, 1), {}),
    ("fsdp+tp", (2, 2, 2), {}),
    ("zero2", (2, 2, 2), {"sharded": True}),  # ZeRO over data of fsdp/tp-split layers
    ("zero2", (8, 1, 1), {"mixed_precision": shardlax.MixedPrecision(param_dtype=jnp.bfloat16)}),
]


def test_restore_on_every_strategy_and_mesh_is_bitwise(tmp_path):
    """zero2 on 8 devices saves; each hop restores the previous hop's save and saves again."""
    utils.need_devices(8)
    first = trainer_for("zero2", (8, 1, 1))
    state = trained(first, 2)
    logical = checkpoint.to_logical(first, state)
    want = host(logical)
    # no device holds a whole moment: Adam's mu of l1.kernel [8, 16] stays split 8 ways
    mu = logical.opt_state[1][0].mu["l1"]["kernel"][...]
    utils.assert_sharding(mu, first.mesh, jax.P(None, "data"))
    directory = tmp_path / "hop0"
    checkpoint.save(first, directory, state)
    for i, (strategy, shape, kw) in enumerate(HOPS, 1):
        trainer = trainer_for(strategy, shape, seed=i, **kw)  # other initial values
        restored = checkpoint.restore(trainer, directory)
        what = f"hop {i}: {strategy} on {shape}"
        assert_laid_out(trainer, restored)
        assert_bitwise(host(checkpoint.to_logical(trainer, restored)), want, what)
        assert int(restored.step) == 2
        if kw.get("mixed_precision") is not None:  # the bf16 copy is the f32 master, cast
            for p, m in zip(jax.tree.leaves(restored.params),
                            jax.tree.leaves(checkpoint.to_logical(trainer, restored).params),
                            strict=True):  # fmt: skip
                assert p.dtype == jnp.bfloat16
                np.testing.assert_array_equal(np.asarray(p), np.asarray(m.astype(jnp.bfloat16)))
        directory = tmp_path / f"hop{i}"
        checkpoint.save(trainer, directory, restored)
    checkpoint.wait()
    meta = json.loads((directory / "2" / "meta" / "metadata").read_text())
    assert meta["saved_from"]["strategy"] == "zero2" and meta["step"] == 2


@pytest.mark.parametrize(
    "strategy,shape",
    [("zero2", (4, 1, 1)), ("fsdp+tp", (2, 2, 2))],
    ids=str,
)
def test_resumed_training_is_bitwise_on_the_same_mesh(tmp_path, strategy, shape):
    """2 steps, save, then at once a donating step; resuming from disk gives 4 steps bitwise."""
    trainer = trainer_for(strategy, shape)
    reference = host(checkpoint.to_logical(trainer, trained(trainer, 4)))
    state = trained(trainer, 2)
    checkpoint.save(trainer, tmp_path, state)
    state, _ = trainer.step(state, make_batch(2))  # donates the saved state's buffers
    del state
    checkpoint.wait()
    state = checkpoint.restore(trainer, tmp_path)  # (the same Trainer: one compile of its step)
    for seed in (2, 3):
        state, _ = trainer.step(state, make_batch(seed))
    assert_bitwise(host(checkpoint.to_logical(trainer, state)), reference, strategy)


def test_resumed_training_on_another_mesh_matches_within_tolerance(tmp_path):
    """Saved by zero2 on 8 devices after 2 steps, resumed by fsdp on 4: equals 4 steps on 8."""
    utils.need_devices(8)
    first = trainer_for("zero2", (8, 1, 1))
    reference = host(checkpoint.to_logical(first, trained(first, 4)))
    checkpoint.save(first, tmp_path, trained(first, 2))
    other = trainer_for("fsdp", (1, 4, 1), seed=5)
    state = checkpoint.restore(other, tmp_path)
    for seed in (2, 3):
        state, _ = other.step(state, make_batch(seed))
    got = host(checkpoint.to_logical(other, state))
    assert sorted(got) == sorted(reference)
    for k, want in reference.items():
        if want.dtype.kind == "f":
            utils.assert_close(got[k], want, jnp.float32, k)
        else:
            np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_manager_keeps_the_last_steps_and_restores_any(tmp_path):
    trainer = trainer_for("dp", (2, 1, 1))
    state = trainer.init()
    saved = {}
    for step in range(1, 5):  # distinct states without compiling a step: shift the weights
        state.params = jax.tree.map(lambda x: x + 1.0, state.params)
        saved[step] = host(checkpoint.to_logical(trainer, state))
        checkpoint.save(trainer, tmp_path, state, step=step, max_to_keep=2)
    checkpoint.wait()
    assert checkpoint.all_steps(tmp_path) == [3, 4]
    for step in (3, 4):
        restored = checkpoint.restore(trainer, tmp_path, step=step)
        assert_bitwise(host(checkpoint.to_logical(trainer, restored)), saved[step], f"step {step}")
    with pytest.raises(ValueError, match=r"holds no complete step 1; it holds steps \[3, 4\]"):
        checkpoint.restore(trainer, tmp_path, step=1)
    with pytest.raises(
        ValueError, match=r"already holds step 4; a checkpoint is never overwritten"
    ):
        checkpoint.save(trainer, tmp_path, state, step=4)
    # a directory deleted behind this process's back is a new one
    shutil.rmtree(tmp_path)
    checkpoint.save(trainer, tmp_path, state, step=4)
    assert checkpoint.all_steps(tmp_path) == [4]


class Bare(nnx.Module):
    """Parameters only: no other state (an empty `rest`)."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(D, HEAD, rngs=rngs)

    def __call__(self, x):
        return self.l1(x)


def test_empty_items_round_trip(tmp_path):
    """No non-parameter state and plain sgd (no optimizer arrays): nothing empty is written."""
    mesh = utils.mesh(2)
    trainer = train.Trainer(Bare(nnx.Rngs(0)), optax.sgd(0.1), loss_fn, mesh=mesh, strategy="zero2")
    state = trainer.init()
    state.params = jax.tree.map(lambda x: x + 1.0, state.params)
    checkpoint.save(trainer, tmp_path, state, step=3)
    restored = checkpoint.restore(trainer, tmp_path)
    assert jax.tree.leaves(restored.rest) == [] and jax.tree.leaves(restored.opt_state) == []
    assert_bitwise(host(restored.params), host(state.params), "params")
    model = checkpoint.restore_model(tmp_path, Bare(nnx.Rngs(1)))
    assert_bitwise(params_of(model), host(state.params), "model")
    adam = train.Trainer(Bare(nnx.Rngs(0)), optax.adam(0.1), loss_fn, mesh=mesh, strategy="zero2")
    with pytest.raises(ValueError, match=r"opt_state\.0\.mu\.l1\.kernel: in the model "
                                         r"\(float32\[8,5\]\), not in the checkpoint"):  # fmt: skip
        checkpoint.restore(adam, tmp_path)


# ------------------------------------------------------------------ bad input
def test_restore_into_another_model_names_every_difference(tmp_path):
    trainer = trainer_for("zero2", (2, 1, 1))
    checkpoint.save(trainer, tmp_path, trainer.init())
    wider = trainer_for("zero2", (2, 1, 1), hidden=24)
    with pytest.raises(ValueError, match=r"params\.l1\.kernel: checkpoint float32\[8,16\], "
                                         r"model float32\[8,24\]") as err:  # fmt: skip
        checkpoint.restore(wider, tmp_path)
    assert "opt_state" in str(err.value) and "nothing was restored" in str(err.value)
    sgd = trainer_for("dp", (2, 1, 1), tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"opt_state\..*mu.*in the checkpoint .*not in the model"):
        checkpoint.restore(sgd, tmp_path)


def test_missing_empty_and_foreign_directories_are_refused(tmp_path):
    trainer = trainer_for("dp", (2, 1, 1))
    with pytest.raises(FileNotFoundError, match=r"no such directory, so there is no checkpoint"):
        checkpoint.restore(trainer, tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a shardlax training checkpoint"):
        checkpoint.restore(trainer, foreign)
    with pytest.raises(ValueError, match=r"is not empty \(notes.txt\) and is not a shardlax"):
        checkpoint.save(trainer, foreign, trainer.init())
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / checkpoint.MARKER).write_text("{}")
    with pytest.raises(ValueError, match=r"holds no complete checkpoint"):
        checkpoint.restore(trainer, empty)


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    trainer = trainer_for("dp", (2, 1, 1))
    state = trainer.init()
    with pytest.raises(ValueError, match=r"Trainer.save\(step=-1\): expected a non-negative int"):
        checkpoint.save(trainer, tmp_path / "a", state, step=-1)
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"this path is a file, not a directory"):
        checkpoint.save(trainer, tmp_path / "file", state)
    with pytest.raises(TypeError, match=r"save_model\(model=...\): expected a flax.nnx.Module"):
        checkpoint.save_model(tmp_path / "m", "weights")
    with pytest.raises(ValueError, match=r"force=True\): the path exists and is not a model"):
        checkpoint.save_model(tmp_path / "file", Net(rngs=nnx.Rngs(0)), force=True)
    checkpoint.save_model(tmp_path / "m", Net(rngs=nnx.Rngs(0)))
    with pytest.raises(
        ValueError, match=r"is a model checkpoint, which has one state and no steps"
    ):
        checkpoint.restore_model(tmp_path / "m", Net(rngs=nnx.Rngs(0)), step=3)
    with pytest.raises(ValueError, match=r"It holds a model checkpoint .*restore_model"):
        checkpoint.restore(trainer, tmp_path / "m")


# orbax reads the arrays in an asyncio loop it closes as soon as one read fails; tensorstore
# then completes the other reads into the closed loop ("Event loop is closed", reported as
# unraisable from tensorstore's threads). That is orbax's, after our ValueError is raised.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_a_clear_error_and_earlier_steps_survive(tmp_path):
    trainer = trainer_for("zero2", (2, 1, 1))
    state = trainer.init()
    checkpoint.save(trainer, tmp_path, state, step=1)
    checkpoint.save(trainer, tmp_path, state, step=2)
    checkpoint.wait()
    want = host(checkpoint.to_logical(trainer, checkpoint.restore(trainer, tmp_path, step=1)))
    for f in (tmp_path / "2" / "opt_state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files: truncate them
            f.write_bytes(f.read_bytes()[:7])
    damaged = r"step 2 of .* could not be read, the checkpoint is incomplete or damaged"
    with pytest.raises(ValueError, match=damaged + r".*Restore another step \(\[1\]\)"):
        checkpoint.restore(trainer, tmp_path)
    again = checkpoint.restore(trainer, tmp_path, step=1)
    assert_bitwise(host(checkpoint.to_logical(trainer, again)), want, "step 1")


# ------------------------------------------------------------------ models
def params_of(model) -> dict[str, np.ndarray]:
    return host(nnx.state(model, nnx.Param))


def test_plain_flax_save_restores_into_a_sharded_model_and_back(tmp_path):
    """A flax user's orbax save of nnx.state(model) <-> a shardlax.nn model on (1, 4, 2)."""
    utils.need_devices(8)
    plain = Net(rngs=nnx.Rngs(0))
    ocp.StandardCheckpointer().save(tmp_path / "user", nnx.state(plain))
    mesh = utils.mesh(1, 4, 2)
    sharded = checkpoint.restore_model(tmp_path / "user", Net(mesh, rngs=nnx.Rngs(9)))
    assert_bitwise(params_of(sharded), params_of(plain), "user -> sharded")
    utils.assert_sharding(sharded.l1.kernel[...], mesh, jax.P("fsdp", "model"))
    # and back: save_model of the sharded model is a plain orbax checkpoint
    for p in jax.tree.leaves(nnx.state(sharded, nnx.Param)):
        p += 1.0
    checkpoint.save_model(tmp_path / "ours", sharded)
    abstract = nnx.state(nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0))))
    got = ocp.StandardCheckpointer().restore(tmp_path / "ours", abstract)
    assert_bitwise(host(nnx.State(got).filter(nnx.Param)), params_of(sharded), "orbax restore")
    one = checkpoint.restore_model(tmp_path / "ours", Net(rngs=nnx.Rngs(1)))
    assert_bitwise(params_of(one), params_of(sharded), "sharded -> plain")
    with pytest.raises(ValueError, match=r"the path exists; a checkpoint is never overwritten"):
        checkpoint.save_model(tmp_path / "ours", one)


def test_restore_model_from_a_training_checkpoint(tmp_path):
    trainer = trainer_for("zero2", (4, 1, 1))
    state = trained(trainer, 2)
    want = host(checkpoint.to_logical(trainer, state).params)
    checkpoint.save(trainer, tmp_path, state)
    model = checkpoint.restore_model(tmp_path, Net(rngs=nnx.Rngs(4)))
    assert_bitwise(params_of(model), want, "trained weights")


def test_restore_model_mismatch_leaves_the_model_untouched(tmp_path):
    checkpoint.save_model(tmp_path / "m", Net(rngs=nnx.Rngs(0)))
    model = Net(rngs=nnx.Rngs(1), hidden=24)
    before = params_of(model)
    with pytest.raises(ValueError, match=r"model\.l2\.kernel: checkpoint float32\[16,8\], "
                                         r"model float32\[24,8\]"):  # fmt: skip
        checkpoint.restore_model(tmp_path / "m", model)
    assert_bitwise(params_of(model), before, "untouched")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=r"not a checkpoint \(neither a model checkpoint"):
        checkpoint.restore_model(other, model)
