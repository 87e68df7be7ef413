"""Smoke runs of the benchmark scripts: they run and write their outputs.

Benchmarks are measurements, not tests: nothing here asserts a time. Each
script runs in its own process (it asks for its own simulated devices before
JAX starts) with `--quick`: tiny sizes, 2-4 devices, a few repeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _run(script: str, out: Path, *extra: str, plot: bool = True) -> list[dict]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    stem = script.removesuffix(".py")
    rows = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()]
    assert rows, f"{stem}.jsonl is empty"
    md = (out / f"{stem}.md").read_text()
    assert md.startswith("# ") and "| ---" in md
    if plot and _have_matplotlib():
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def _common():
    sys.path.insert(0, str(BENCH))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCH))
    return _common


def test_results_go_outside_the_repository_unless_published():
    import argparse

    C = _common()
    parser = argparse.ArgumentParser()
    C.add_output_args(parser)
    parser.add_argument("--quick", action="store_true")
    default = C.output_dir(parser.parse_args([]))
    assert default == C.DEFAULT_OUT and ROOT not in default.resolve().parents
    assert C.output_dir(parser.parse_args(["--publish"])) == BENCH / "results"
    assert C.output_dir(parser.parse_args(["--out", "/tmp/x", "--quick"])) == Path("/tmp/x")
    with pytest.raises(SystemExit, match="--quick never overwrites the published results"):
        C.output_dir(parser.parse_args(["--publish", "--quick"]))
    with pytest.raises(SystemExit, match="--quick never overwrites"):
        C.output_dir(parser.parse_args(["--quick", "--out", str(BENCH / "results")]))
    with pytest.raises(SystemExit, match="--publish writes benchmarks/results/; drop --out"):
        C.output_dir(parser.parse_args(["--publish", "--out", "/tmp/x"]))


@pytest.mark.slow
def test_collectives_quick(tmp_path):
    rows = _run("collectives.py", tmp_path)
    assert {r["collective"] for r in rows} == {
        "psum", "all_gather", "psum_scatter", "ppermute", "all_to_all"
    }  # fmt: skip
    assert {r["impl"] for r in rows} == {"shardlax", "lax"}
    assert {r["devices"] for r in rows} == {2, 4}
    for r in rows:
        # The compiled program holds exactly the one collective, moving S bytes.
        assert r["audit_ok"], r
        assert r["same_hlo_as_lax"], r
        assert r["machine"]["jax"] and r["machine"]["cpu_count"]
        assert r["median_s"] > 0 and r["ceiling_agg_GBps"] > 0


@pytest.mark.slow
def test_layers_quick(tmp_path):
    # One row per code path (plain twin, Trainer, scanned model with loop trips,
    # fully_shard_scan, dict-param twin); fsdp_tp and fsdp_deep_remat reuse them.
    rows = _run(
        "layers.py", tmp_path, "--devices", "4", "--strict",
        "--rows", "tp_mlp", "zero2", "fsdp_deep", "fully_shard_deep", "tinylm",
    )  # fmt: skip
    by = {(r["row"], r["impl"]): r for r in rows}
    assert ("tp_mlp", "shardlax") in by
    for name in {r["row"] for r in rows}:
        impls = {i for (n, i) in by if n == name}
        assert impls == {"shardlax", "gspmd", "unsharded"}, (name, impls)
        losses = [by[name, i]["loss"] for i in impls]
        # The three candidates compute the same step (same parameters and batch).
        assert max(losses) - min(losses) <= 1e-3 * max(1.0, abs(losses[0])), (name, losses)
        s = by[name, "shardlax"]
        assert s["ratio_vs_gspmd"] > 0 and s["compile_ratio_vs_unsharded"] > 0
        assert by[name, "unsharded"]["collectives"]["tensors"] == 0
    for r in rows:
        if r["impl"] == "shardlax":  # every report says which GSPMD baseline it beat
            assert "with_sharding_constraint" in r["gspmd_baseline"], r["row"]
    assert "GSPMD baseline" in (tmp_path / "layers.md").read_text()
    tp = by["tp_mlp", "shardlax"]
    assert tp["collectives"]["kinds"] == {"all-reduce": 1}
    assert tp["collectives"]["bytes"] == tp["minimum_bytes"]


@pytest.mark.slow
def test_scaleout_quick(tmp_path):
    """One abstract study (`shardlax.plan` in its own process) on 8 devices, reported."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scaleout.py"), "--quick", "--devices", "8",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = [json.loads(line) for line in (tmp_path / "scaleout.jsonl").read_text().splitlines()]
    assert row["devices"] == 8 and row["preset"] == "tiny"
    assert row["shardlax"]["wire_bytes"] > 0 and row["gspmd"]["wire_bytes"] > 0
    assert 1.0 <= row["goals"]["arguments_vs_ideal"] < 1.05
    md = (tmp_path / "scaleout.md").read_text()
    assert md.startswith("# ") and "| ---" in md and "GSPMD baseline" in md


@pytest.mark.slow
def test_tracing_quick(tmp_path):
    """The lowering benchmark: every candidate lowers and compiles, and is reported."""
    rows = _run("tracing.py", tmp_path, plot=False)
    assert (tmp_path / "tracing.md").read_text().startswith("# Lowering")
    by = {(r["layers"], r["impl"]): r for r in rows}
    assert {i for (_, i) in by} == {"shardlax", "shardlax, no replay", "trainer", "gspmd"}
    for r in rows:
        assert r["lower_s"] > 0 and r["compile_s"] > 0 and r["total_ratio_vs_gspmd"] > 0
    assert by[4, "gspmd"]["lower_ratio_vs_gspmd"] == 1.0
