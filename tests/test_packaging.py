"""Packaging: `kernels/` ships as `shardlax.kernels` in a plain (non-editable) install too;
the metadata is what pip and setuptools expect; the dependency floors are the ones CI tests."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tomllib

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
    (meta,) = target.glob("shardlax-*.dist-info/METADATA")
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text  # PEP 639, no deprecated license table
    assert "Provides-Extra: plot" not in text  # matplotlib is a core dependency
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


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_floors_in_ci_are_the_declared_floors():
    """`.ci/run` pins exactly the lower bounds pyproject.toml declares, and jaxlib with jax."""
    floors = {}
    for dep in _pyproject()["project"]["dependencies"]:
        name, low = re.match(r"([a-z_-]+)>=([0-9.]+)", dep).groups()
        floors[name] = low
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = dict(re.findall(r"([a-z_-]+)==([0-9.]+)", re.search(r'FLOORS="([^"]*)"', ci)[1]))
    assert pinned.pop("jaxlib") == pinned["jax"]
    for name, low in floors.items():
        # a floor like numpy>=2.0 is pinned at a release of it (2.0.2: jax's own floor)
        assert pinned[name] == low or pinned[name].startswith(low + "."), (name, low, pinned)
    assert set(pinned) == set(floors)


def test_ci_cleans_up_and_has_no_plot_extra():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"trap 'rm -rf \"\$WORK\"' EXIT", ci)
    assert "plot" not in _pyproject()["project"].get("optional-dependencies", {})
    assert _pyproject()["project"]["license"] == "Apache-2.0"


def test_every_subpackage_is_packaged():
    """A plain install ships every folder of src/shardlax that has an __init__.py."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found | {"shardlax.kernels"} == listed, sorted(found ^ listed)
