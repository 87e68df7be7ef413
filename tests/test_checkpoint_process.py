"""shardlax.checkpoint across processes: a save killed midway, and 2 processes via jax.distributed.

The workers are this file run as a script (`python -m tests.test_checkpoint_process
MODE ...`): each asks for its own CPU devices before JAX starts. The parent
bounds every child with a timeout (a peer that never arrives aborts, it does
not raise) and checks the directory the child left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240


# ------------------------------------------------------------------ shared by both sides
def _setup(mode_devices: int, worker: str | None = None) -> None:
    import jax

    if worker is None:
        jax.config.update("jax_num_cpu_devices", mode_devices)
        return
    from shardlax._launch import initialize_worker

    pid, n, coordinator = worker.split(",")
    initialize_worker(int(pid), int(n), coordinator, mode_devices, TIMEOUT)


def _trainer(strategy: str, shape, sharded: bool = False):
    from flax import nnx

    import shardlax
    from shardlax import train
    from tests.test_checkpoint import Net, adamw, loss_fn

    mesh = shardlax.make_mesh(*shape)
    model = Net(mesh if sharded else None, rngs=nnx.Rngs(0))
    return train.Trainer(model, adamw(), loss_fn, mesh=mesh, strategy=strategy)


def random_state(trainer, seed: int):
    """A TrainState whose every float leaf is random (built through the logical layout)."""
    import jax

    from shardlax import checkpoint

    rng = np.random.default_rng(seed)
    abstract = checkpoint.abstract_logical(trainer)
    specs = checkpoint.logical_specs(trainer)
    init = trainer.init()

    def make(a, spec):
        if np.dtype(a.dtype).kind == "f":
            host = rng.standard_normal(a.shape).astype(a.dtype)
        else:
            host = np.full(a.shape, 3, a.dtype)
        sharding = jax.sharding.NamedSharding(trainer.mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: host[idx])

    def tree(item):
        return jax.tree.map(make, getattr(abstract, item), getattr(specs, item),
                            is_leaf=lambda x: isinstance(x, jax.P))  # fmt: skip

    logical = checkpoint.Logical(tree("params"), tree("opt_state"), init.rest, np.int32(7))
    return checkpoint.from_logical(trainer, logical)


def gathered(trainer, state) -> dict[str, np.ndarray]:
    """The logical layout of `state` on host, by path (also when it spans processes)."""
    import jax
    from jax.experimental import multihost_utils

    from shardlax import checkpoint

    logical = checkpoint.to_logical(trainer, state)

    def get(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return {jax.tree_util.keystr(p): get(x)
            for p, x in jax.tree_util.tree_leaves_with_path(logical)}  # fmt: skip


def _same(got: dict, want: dict) -> list[str]:
    bad = [k for k in want if k not in got or got[k].dtype != want[k].dtype
           or got[k].shape != want[k].shape or not np.array_equal(got[k], want[k])]  # fmt: skip
    return bad + [k for k in got if k not in want]


# ------------------------------------------------------------------ workers
def _worker_kill(directory: str) -> None:
    """Save step 1 and wait; start saving step 2 and stall it just before its commit (rename)."""
    import asyncio

    import jax
    from orbax.checkpoint._src.path import atomicity

    from shardlax import checkpoint

    with jax.numpy_dtype_promotion("standard"):
        trainer = _trainer("zero2", (2, 1, 1))
        checkpoint.save(trainer, directory, random_state(trainer, 1), step=1)
        checkpoint.wait()

        async def stall(self, *args, **kwargs):
            print(f"COMMITTING {self.get()}", flush=True)
            await asyncio.sleep(600)

        atomicity.AtomicRenameTemporaryPath.finalize = stall
        checkpoint.save(trainer, directory, random_state(trainer, 2), step=2)
        print("SAVE RETURNED", flush=True)
        time.sleep(600)


def _worker_distributed(directory: str) -> None:
    """2 processes x 4 devices: zero2 on (8,1,1) saves; fsdp+tp on (1,4,2) restores it."""
    import jax

    from shardlax import checkpoint

    with jax.numpy_dtype_promotion("standard"):
        saver = _trainer("zero2", (8, 1, 1))
        state = random_state(saver, 3)
        want = gathered(saver, state)
        checkpoint.save(saver, directory, state)
        checkpoint.wait()
        other = _trainer("fsdp+tp", (1, 4, 2), sharded=True)
        got = gathered(other, checkpoint.restore(other, directory))
        bad = _same(got, want)
        if jax.process_index() == 0:
            np.savez(Path(directory).parent / "saved.npz", **want)
            print(json.dumps({"bad": bad, "steps": checkpoint.all_steps(directory)}), flush=True)


# ------------------------------------------------------------------ tests
def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def _worker_cmd(mode: str, directory: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_checkpoint_process", mode, str(directory), *extra]


def test_a_save_killed_before_its_commit_leaves_the_last_checkpoint_intact(tmp_path):
    import jax

    from shardlax import checkpoint

    directory = tmp_path / "run"
    proc = subprocess.Popen(_worker_cmd("kill", directory), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    lines, deadline = [], time.monotonic() + TIMEOUT
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("COMMITTING") or time.monotonic() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert any(x.startswith("COMMITTING") for x in lines), "".join(lines[-30:])
    # the interrupted step is a temporary directory, never a step
    tmp = [p.name for p in directory.iterdir() if p.name.startswith("2.")]
    assert tmp and "2" not in os.listdir(directory), os.listdir(directory)
    assert checkpoint.all_steps(directory) == [1]
    with jax.numpy_dtype_promotion("standard"):
        trainer = _trainer("zero2", (2, 1, 1))
        want = gathered(trainer, random_state(trainer, 1))
        got = gathered(trainer, checkpoint.restore(trainer, directory))
        assert _same(got, want) == []
        # the run goes on: step 2 saves again over the leftovers and restores
        state = random_state(trainer, 2)
        checkpoint.save(trainer, directory, state, step=2)
        checkpoint.wait()
        assert checkpoint.all_steps(directory) == [1, 2]
        got = gathered(trainer, checkpoint.restore(trainer, directory))
        assert _same(got, gathered(trainer, state)) == []


def test_two_processes_save_and_restore_and_one_process_restores_their_checkpoint(tmp_path):
    import jax

    from shardlax import checkpoint
    from shardlax._launch import free_port

    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    directory = tmp_path / "run"
    worker = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(_worker_cmd("distributed", directory, f"{i},2,{worker}"), cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
             for i in range(2)]  # fmt: skip
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2 processes did not finish in time")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    report = json.loads([x for x in outs[0].splitlines() if x.startswith("{")][-1])
    assert report == {"bad": [], "steps": [7]}
    # one process, 2 devices, another strategy
    saved = dict(np.load(tmp_path / "saved.npz"))
    with jax.numpy_dtype_promotion("standard"):
        trainer = _trainer("zero1", (2, 1, 1))
        got = gathered(trainer, checkpoint.restore(trainer, directory))
    assert _same(got, saved) == []


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "kill":
        _setup(2)
        _worker_kill(directory)
    elif mode == "distributed":
        _setup(4, sys.argv[3])
        _worker_distributed(directory)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
