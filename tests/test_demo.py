"""The main job runs end to end."""

from __future__ import annotations

import pytest

from shardlax.__main__ import build_parser, main


def test_mlp_demo_runs_and_agrees(capsys):
    argv = ["demo", "--model", "mlp", "--mesh", "2,1,4", "--d-model", "32", "--batch", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "OK: sharded == single device, compiled == declared" in out
    assert "| all-reduce | model | f32 | 1 | 1 (1) |" in out


def test_demo_rejects_a_bad_mesh():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--mesh", "2,2"])
