"""The main job runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardlax.__main__ import build_parser, main
from tests import utils


def test_mlp_demo_runs_and_agrees(capsys):
    argv = ["demo", "--model", "mlp", "--mesh", "2,1,4", "--d-model", "32", "--batch", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OK: sharded == single device, compiled == declared" in out
    assert "| all-reduce | model | f32 | 1 | 1 (1) |" in out


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
    assert summary["equal"] and summary["collectives_ok"]
    assert len(summary["losses_sharded"]) == len(summary["losses_single"]) == 3
    utils.assert_close(summary["losses_sharded"], summary["losses_single"])
    assert summary["losses_single"][-1] < summary["losses_single"][0]  # it learns
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert "entropy floor" in out and "| reduce-scatter | fsdp | f32 |" in out
    assert out.rstrip().endswith("OK")


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


def test_processes_must_divide_the_mesh(capsys):
    assert main(["demo", "--mesh", "1,1,3", "--processes", "2"]) == 2
    assert "cannot share evenly" in capsys.readouterr().out


def test_demo_reports_bad_flags_without_a_traceback(capsys):
    argv = ["demo", "--mesh", "1,1,8", *TINY]  # 2 heads cannot split over 8 devices
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardlax demo: ") and "num_heads" in err and "'model'" in err
