"""The main job runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from shardlax import _demo_lm, _demo_mlp
from shardlax.__main__ import build_parser, main
from tests import utils


def test_mlp_demo_runs_agrees_and_writes_its_summary(tmp_path, capsys):
    argv = ["demo", "--model", "mlp", "--mesh", "2,1,4", "--d-model", "32", "--batch", "8",
            "--out", str(tmp_path / "mlp")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OK: sharded == single device, compiled == declared" in out
    assert "| all-reduce | model | f32 | 1 | 1 (1) |" in out
    summary = json.loads((tmp_path / "mlp" / "demo.json").read_text())
    assert summary["ok"] and summary["collectives_ok"] and summary["model"] == "mlp"
    assert summary["flags"]["mesh"] == [2, 1, 4] and summary["flags"]["d_model"] == 32
    assert summary["versions"]["jax"] == jax.__version__
    assert {"build_s", "compile_s", "run_s", "total_s"} <= set(summary["timings"])
    rows = {(r["kind"], tuple(r["axes"])): r for r in summary["collectives"]}
    assert (
        rows["all-reduce", ("model",)]["declared_count"]
        == 2
        == rows["all-reduce", ("model",)]["compiled_count"]
    )


def test_demo_bounds_use_the_suite_tolerance():
    f32 = utils.tolerance(jnp.float32)["rtol"]
    assert _demo_lm.F32_RTOL == f32 == _demo_mlp.F32_RTOL


def test_agreement_check():
    """Exact first steps, then at most drift_factor x the drift of the permuted one-device run."""
    ref = [4.0, 3.0, 2.0, 1.5, 1.2]
    eps = _demo_lm.F32_RTOL
    same = _demo_lm.agreement(ref, ref, ref, exact_steps=2, drift_factor=10)
    assert same["ok"] and same["max_rel_sharded"] == 0
    # step 0 off by 10x the f32 tolerance: a real bug, whatever the permuted run does
    bug = [4.0 * (1 + 10 * eps), *ref[1:]]
    noisy = [r * (1 + 0.05) for r in ref]
    check = _demo_lm.agreement(bug, ref, noisy, exact_steps=2, drift_factor=10)
    assert not check["ok"] and check["first_step_over"] == 0
    # later steps: rounding drift (permuted run) of 1e-4 by step 3 allows 1e-3 from step 3 on
    perm = [4.0, 3.0, 2.0, 1.5 * (1 + 1e-4), 1.2]
    fine = [4.0, 3.0, 2.0, 1.5 * (1 + 9e-4), 1.2 * (1 + 9e-4)]
    assert _demo_lm.agreement(fine, ref, perm, exact_steps=2, drift_factor=10)["ok"]
    early = [4.0, 3.0, 2.0 * (1 + 9e-4), 1.5, 1.2]  # before the permuted run drifted
    check = _demo_lm.agreement(early, ref, perm, exact_steps=2, drift_factor=10)
    assert not check["ok"] and check["first_step_over"] == 2
    far = [4.0, 3.0, 2.0, 1.5, 1.2 * (1 + 2e-3)]
    assert not _demo_lm.agreement(far, ref, perm, exact_steps=2, drift_factor=10)["ok"]
    nan = [4.0, 3.0, 2.0, 1.5, float("nan")]
    assert not _demo_lm.agreement(nan, ref, ref, exact_steps=2, drift_factor=10)["ok"]


def test_demo_rejects_a_bad_mesh():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--mesh", "2,2"])


TINY = ["--steps", "3", "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "8",
        "--batch", "8", "--vocab", "32", "--log-every", "1"]  # fmt: skip


@pytest.mark.standard_dtype_promotion
def test_lm_demo_trains_sharded_equal_to_one_device(tmp_path, capsys):
    assert main(["demo", "--mesh", "2,2,2", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["equal"] and summary["collectives_ok"] and summary["ok"]
    assert len(summary["losses_sharded"]) == len(summary["losses_single"]) == 3
    utils.assert_close(summary["losses_sharded"], summary["losses_single"])
    utils.assert_close(summary["losses_permuted"], summary["losses_single"])
    assert summary["losses_single"][-1] < summary["losses_single"][0]  # it learns
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert "entropy floor" in out and "| reduce-scatter | fsdp | f32 |" in out
    assert "the f32 tolerance" in out and "compiled in" in out
    assert out.rstrip().endswith("OK")
    # what demo.json promises: flags, seed, versions, the collective table, timings
    assert summary["flags"]["steps"] == 3 and summary["seed"] == 0
    assert {"jax", "flax", "optax", "numpy", "python"} <= set(summary["versions"])
    assert all(r["ok"] for r in summary["collectives"]) and len(summary["collectives"]) >= 5
    assert {"compile_sharded_s", "compile_single_s", "run_s", "total_s"} <= set(summary["timings"])


@pytest.mark.slow
@pytest.mark.standard_dtype_promotion
@pytest.mark.parametrize(
    "argv",
    [
        ["--mesh", "1,2,2", "--vocab", "7"],  # padded vocabulary
        ["--mesh", "2,1,4", "--vocab", "13", "--d-model", "48", "--heads", "4"],
    ],
    ids=["vocab7-1,2,2", "vocab13-d48-2,1,4"],
)
def test_lm_demo_sweep(tmp_path, argv):
    """Odd vocabularies, another width, other meshes: each compiles one step per run."""
    flags = ["--steps", "4", "--layers", "1", "--seq-len", "8", "--batch", "8",
             "--d-model", "32", "--heads", "2", "--log-every", "4"]  # fmt: skip
    assert main(["demo", *flags, *argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["agreement"]["ok"] and summary["collectives_ok"]


@pytest.mark.slow
@pytest.mark.standard_dtype_promotion
def test_lm_demo_saves_on_one_mesh_and_resumes_on_another(tmp_path):
    """--save on (2,2,2), --resume on (1,4,1): the run continues at the saved step, and the
    resumed sharded run still equals the one-device run resumed from the same checkpoint."""
    flags = ["--steps", "3", "--layers", "1", "--seq-len", "8", "--batch", "8",
             "--d-model", "32", "--heads", "2", "--log-every", "1"]  # fmt: skip
    ck = tmp_path / "ck"
    assert main(["demo", *flags, "--mesh", "2,2,2", "--save", str(ck),
                 "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    first = json.loads((tmp_path / "a" / "demo.json").read_text())
    assert main(["demo", *flags, "--mesh", "1,4,1", "--resume", str(ck),
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    resumed = json.loads((tmp_path / "b" / "demo.json").read_text())
    assert resumed["agreement"]["ok"]
    utils.assert_close(resumed["losses_sharded"], resumed["losses_single"])
    # it continued training: below where the first run ended, not back at the start
    assert resumed["losses_single"][0] < first["losses_single"][0]


@pytest.mark.slow
@pytest.mark.standard_dtype_promotion
def test_lm_demo_across_two_processes_equals_one_device(tmp_path):
    """2 local processes joined by jax.distributed train like one device (and so like 1 process).

    Runs under a timeout: a peer that never arrives makes JAX abort instead of
    raising, so the launcher kills every process after --timeout seconds, and
    the subprocess call has its own timeout on top.
    """
    cmd = [sys.executable, "-m", "shardlax", "demo", "--mesh", "2,2,2", *TINY,
           "--out", str(tmp_path), "--processes", "2", "--timeout", "240"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["processes"] == 2
    utils.assert_close(summary["losses_sharded"], summary["losses_single"])
    assert summary["equal"] and summary["collectives_ok"]


def test_demo_reports_bad_flags_in_flag_terms(capsys):
    argv = ["demo", "--mesh", "1,1,8", *TINY]  # 2 heads cannot split over 8 devices
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardlax demo: --heads 2: attention heads are split over the model")
