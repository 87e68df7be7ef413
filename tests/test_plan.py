"""shardlax.plan: abstract compiles give the figures of the real program, on any mesh size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, plan
from shardlax.models import TinyLM, TinyLMConfig
from tests import utils

#: optax.adam's bias correction mixes its int32 count with Python floats.
pytestmark = pytest.mark.standard_dtype_promotion

CFG = TinyLMConfig(vocab=256, d_model=32, n_layers=1, n_heads=4, d_ff=64, seq_len=16)


def test_abstract_study_equals_the_concrete_program():
    """Nothing allocated, same program: memory and collectives of the real step."""
    utils.need_devices(8)
    shape = {"fsdp": 4, "model": 2}
    s = plan.study(CFG, "fsdp+tp", shape, batch=8, seq=16, gspmd=False, single=False)
    mesh = shardlax.make_mesh(**shape)
    model = TinyLM(CFG, mesh=mesh, rngs=nnx.Rngs(0))
    trainer = shardlax.Trainer(
        model, optax.adam(1e-4), lambda m, b: m.loss(*b), mesh=mesh, strategy="fsdp+tp"
    )
    state = trainer.init()
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, CFG.vocab)
    tok = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
    compiled = trainer.step.lower(state, (tok, tok)).compile()
    mem = audit.memory(compiled)
    report = audit.collectives(compiled)
    assert (s.shardlax.arguments, s.shardlax.temp) == (mem.arguments, mem.temp)
    assert s.shardlax.wire_bytes == report.executed_wire_bytes() > 0
    assert s.shardlax.collectives == sum(c.operands * c.trips for c in report)
    # per-device state: the global parameters + Adam moments over 8, from the model itself
    n_state = sum(
        3 * x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    assert s.ideal_arguments == pytest.approx((n_state + 2 * 8 * 16 * 4) / 8, rel=0.01)
    assert s.params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(strategy="zero3", mesh_shape={"fsdp": 8}, batch=8),
         r"plan.study\(strategy='zero3'\): expected one of \('fsdp', 'fsdp\+tp'\)"),
        (dict(strategy="fsdp", mesh_shape={"fsdp": 64}, batch=64),
         r"needs 64 devices, this process has 8\. Run `python -m shardlax.plan`"),
        (dict(strategy="fsdp", mesh_shape={"fsdp": 4}, batch=6),
         r"batch=6\): the batch is split over data x fsdp \(size 4\): 4 does not divide 6"),
        (dict(strategy="fsdp", mesh_shape={"fsdp": 4, "model": 2}, batch=8),
         r"a 'model' axis of size 2 needs strategy='fsdp\+tp'"),
        (dict(strategy="fsdp", mesh_shape={"fsdp": 1024}, batch=1024),
         r"1024 devices, more than the 512 this study simulates"),
        (dict(strategy="fsdp", mesh_shape={"tensor": 8}, batch=8), r"unknown axes \['tensor'\]"),
    ],
)  # fmt: skip
def test_bad_study_arguments_are_clear_errors(kwargs, match):
    utils.need_devices(8)
    with pytest.raises(ValueError, match=match):
        plan.study(CFG, **kwargs)


@pytest.mark.slow
def test_cli_asks_for_its_own_devices(tmp_path):
    """16 simulated devices (the test process has 8): the CLI re-runs itself and reports
    shardlax, the constrained GSPMD twin and the one-device ideal."""
    out = tmp_path / "plan.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    argv = ["--preset", "tiny", "--n-layers", "1", "--mesh", "fsdp=16", "--batch", "16",
            "--seq", "16", "--json", str(out)]  # fmt: skip
    # JAX starts first with its default device count: main must re-run itself
    code = "import sys, jax; jax.devices(); from shardlax import plan; "
    code += "sys.exit(plan.main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "GSPMD (constrained)" in proc.stdout and "ideal (1/N)" in proc.stdout
    s = json.loads(out.read_text())
    assert s["devices"] == 16 and s["mesh"] == {"fsdp": 16}
    g = s["goals"]
    # parameters + Adam state + batch: 1/N of the whole, up to the replicated scalars
    assert 1.0 <= g["arguments_vs_ideal"] < 1.02, g
    assert s["shardlax"]["wire_bytes"] > 0 and s["gspmd"]["wire_bytes"] > 0
    assert s["single"]["collectives"] == 0 and s["single"]["wire_bytes"] == 0
    assert s["gspmd_baseline"].startswith("constrained")


def test_cli_rejects_a_bad_mesh():
    assert plan.main(["--mesh", "fsdp=600"]) == 2
    with pytest.raises(SystemExit, match="expected AXIS=SIZE"):
        plan.main(["--mesh", "fsdp"])
