"""Smoke run of benchmarks/checkpoint.py --quick: it runs and writes its rows and table.

A benchmark is a measurement, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_checkpoint_benchmark_quick(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "checkpoint.py"), "--quick", "--out",
         str(tmp_path), "--scratch", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ceiling: write" in proc.stdout and "restore zero2/8 -> dp/1" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "checkpoint.jsonl").read_text().splitlines()]
    layouts = {"dp/1", "zero2/8", "fsdp/8", "fsdp+tp/(1,4,2)"}
    assert {(r["saved_on"], r["restored_on"]) for r in rows} == {
        (a, b) for a in layouts for b in layouts
    }
    for r in rows:
        assert r["bytes"] > 0 and r["bytes_on_disk"] > 0
        assert r["save_s"] >= r["save_blocking_s"] > 0 and r["restore_s"] > 0
        assert r["ceiling_write_GBps"] > 0 and r["ceiling_read_GBps"] > 0
    md = (tmp_path / "checkpoint.md").read_text()
    assert md.startswith("# Checkpoint save / restore") and "| ---" in md
    # the scratch checkpoints are removed: only the outputs remain
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.jsonl", "checkpoint.md"]
