"""Every Python example in the README and in the docstrings runs as written.

Each README example runs in a fresh Python process with none of the test
suite's setup (no device count from conftest, default dtype promotion), so
an example that forgets to ask for its simulated devices fails here as it
would for a user. Docstring examples run through `doctest` in one fresh
process that asks for 8 CPU devices first, as the README says to.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

#: modules whose docstring examples doctest runs (every module with a `>>>` must be here)
DOCTEST_MODULES = [
    "shardlax.audit",
    "shardlax.checkpoint",
    "shardlax.data",
    "shardlax.fsdp",
    "shardlax.mesh",
    "shardlax.models._tinylm",
    "shardlax.nn._column",
    "shardlax.parallelize",
    "shardlax.precision",
    "shardlax.train",
    "shardlax.zero",
]

DOCTEST_RUNNER = """
import jax

jax.config.update("jax_num_cpu_devices", 8)
import doctest, importlib, sys
import jax.numpy as jnp, numpy as np, optax
from flax import nnx
import shardlax

globs = dict(jax=jax, jnp=jnp, np=np, optax=optax, nnx=nnx, shardlax=shardlax)
failed = 0
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, extraglobs=globs, optionflags=flags, report=True)
    print(f"{name}: {result.attempted} examples, {result.failed} failed", flush=True)
    failed += result.failed
sys.exit(1 if failed else 0)
"""


def _fresh_env() -> dict:
    """The environment of a user's shell: no device count or XLA flags from the suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_readme_has_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_as_written_in_a_fresh_process(index, tmp_path):
    code = EXAMPLES[index]
    assert 'jax.config.update("jax_num_cpu_devices", 8)' in code.split("\n\n")[1], (
        "each example asks for its simulated devices first"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_fresh_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"README example {index}:\n{proc.stderr[-4000:]}"


def test_every_module_with_examples_is_doctested():
    have = set()
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        if ">>>" in path.read_text():
            rel = path.relative_to(ROOT / "src" if "src" in path.parts else ROOT)
            name = ".".join(rel.with_suffix("").parts)
            have.add(name.replace("kernels.", "shardlax.kernels.", 1))
    assert have <= set(DOCTEST_MODULES), sorted(have - set(DOCTEST_MODULES))


def test_docstring_examples_run():
    proc = subprocess.run(
        [sys.executable, "-c", DOCTEST_RUNNER, *DOCTEST_MODULES], cwd=ROOT, env=_fresh_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for name in DOCTEST_MODULES:
        assert f"{name}: " in proc.stdout
