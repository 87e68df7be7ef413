"""`kernels/` ships as `shardlax.kernels` in a plain (non-editable) install too."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plain_install_contains_the_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(ROOT)],
        check=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert (target / "shardlax" / "kernels" / "_collectives.py").is_file()
    assert (target / "shardlax" / "py.typed").is_file()
    code = (
        "import shardlax, shardlax.kernels as k, shardlax.nn, shardlax.models;"
        "print(k.__file__); print(k.column_parallel_matmul.__name__)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    ).stdout.split()  # fmt: skip
    assert out[0].startswith(str(target)), out
    assert out[1] == "column_parallel_matmul"
