"""`python -m shardlax demo` rejects bad flags before JAX compiles anything.

Each bad value must exit with status 2 and one line on stderr that names the
flag, the value, the rule and a fix, with no traceback. Most cases call
`check_flags` directly (the function `main` runs first); a few run the real
command in a subprocess, without the test suite's device setting, to show
the exit code, the stream and the timing as a user sees them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from shardlax.__main__ import build_parser, check_flags, check_out, main
from shardlax._launch import FlagError
from shardlax.models import TinyLMConfig


def _args(*argv: str):
    return build_parser().parse_args(["demo", *argv])


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # JAX_LOG_COMPILES: anything compiled would add lines to stderr
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_LOG_COMPILES"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "shardlax", *argv],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


# flag, value (other flags), the message must match
BAD = [
    (["--steps", "0"], r"^--steps 0: the number of training steps must be at least 1\. "
                       r"Pass e\.g\. --steps 200\.$"),
    (["--steps", "-5"], r"^--steps -5: .* at least 1"),
    (["--batch", "0"], r"^--batch 0: .* at least 1"),
    (["--seq-len", "0"], r"^--seq-len 0: .* at least 1"),
    (["--layers", "0"], r"^--layers 0: the number of transformer blocks must be at least 1"),
    (["--log-every", "0"], r"^--log-every 0: .* at least 1"),
    (["--kv-heads", "-1"], r"^--kv-heads -1: .* at least 0"),
    (["--vocab", "1"], r"^--vocab 1: the vocabulary size must be at least 2"),
    (["--order", "1"], r"^--order 1: .* at least 2"),
    (["--exact-steps", "-1"], r"^--exact-steps -1: .* at least 0"),
    (["--seed", "-1"], r"^--seed -1: the seed must be in \[0, 2\*\*32\)"),
    (["--lr", "0"], r"^--lr 0\.0: the learning rate must be a finite number > 0\. "
                    r"Pass e\.g\. --lr 1e-2\.$"),
    (["--lr", "nan"], r"^--lr nan: .* finite number > 0"),
    (["--weight-decay", "-0.1"], r"^--weight-decay -0\.1: .* finite number >= 0"),
    (["--timeout", "0"], r"^--timeout 0\.0: the timeout in seconds must be a finite number > 0"),
    (["--drift-factor", "0.5"], r"^--drift-factor 0\.5: .*a factor below 1"),
    (["--branching", "9", "--vocab", "8"], r"^--branching 9: .* between 1 and --vocab 8"),
    (["--vocab", "5000", "--order", "3"], r"^--vocab 5000: with --order 3 .* \(limit 2\*\*24\)"),
    (["--processes", "3"], r"^--processes 3: the mesh --mesh 2,2,2 has 8 devices, which 3 "
                           r"processes cannot share evenly\. Choose --processes among the "
                           r"divisors of 8"),
    (["--batch", "3"], r"^--batch 3: the batch is split over the data and fsdp axes of "
                       r"--mesh 2,2,2 \(2 x 2 = 4 parts\), and 4 does not divide 3\. "
                       r"Use --batch 4, or a mesh"),
    (["--mesh", "3,1,1"], r"^--batch 16: .*--mesh 3,1,1 \(3 x 1 = 3 parts\).*Use --batch 18"),
    (["--d-model", "30"], r"^--d-model 30: each of the --heads 4 attention heads gets "
                          r"--d-model/--heads features.*Use --d-model 32 \(8 per head\)"),
    (["--d-model", "36", "--heads", "12", "--mesh", "1,1,2"], r"^--d-model 36: .*even"),
    (["--heads", "3"], r"^--heads 3: attention heads are split over the model axis of "
                       r"--mesh 2,2,2 \(size 2\), and 2 does not divide 3\. Use --heads 4"),
    (["--kv-heads", "3"], r"^--kv-heads 3: grouped-query attention .* divisors of 4"),
    (["--kv-heads", "1"], r"^--kv-heads 1: key/value heads are split over the model axis"),
    (["--mesh", "1,3,1", "--batch", "3"], r"^--d-model 64: FSDP splits every weight over the "
                                         r"fsdp axis of --mesh 1,3,1 \(size 3\).*--d-model 66"),
    (["--d-ff", "30", "--mesh", "1,1,4"], r"^--d-ff 30: the MLP width 30 is split over the model"),
    (["--sequence-parallel", "--seq-len", "7", "--mesh", "1,1,2", "--batch", "2"],
     r"^--seq-len 7: --sequence-parallel splits the sequence .* Use --seq-len 8"),
    (["--model", "mlp", "--d-ff", "30", "--mesh", "1,1,4"], r"^--d-ff 30: the MLP width"),
    (["--model", "mlp", "--save", "ck"], r"^--save ck: only the TinyLM demo saves and resumes"),
    (["--resume", "/nonexistent-ck"], r"^--resume /nonexistent-ck: no demo checkpoint there"),
    (["--resume", "/nonexistent-ck", "--processes", "2"],
     r"^--resume /nonexistent-ck: resuming runs in one process"),
    (["--save", "/proc/forbidden"], r"^--save /proc/forbidden: the folder cannot be created"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "match"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_is_named_with_its_rule_and_a_fix(argv, match):
    with pytest.raises(FlagError, match=match):
        check_flags(_args(*argv))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--vocab", "7"],
        ["--mesh", "1,1,8", "--heads", "8", "--d-model", "64"],
        ["--mesh", "8,1,1", "--batch", "8"],
        ["--kv-heads", "2", "--heads", "4"],
        ["--sequence-parallel", "--seq-len", "16"],
        ["--model", "mlp", "--mesh", "2,1,4", "--d-model", "32", "--batch", "8"],
    ],
)
def test_good_flags_pass(argv):
    check_flags(_args(*argv))


def test_every_rule_of_the_layers_is_checked_first():
    """What check_flags accepts, TinyLM builds (a small grid of meshes and widths)."""
    import jax
    from flax import nnx

    import shardlax
    from shardlax.models import TinyLM

    built = 0
    for mesh in ((1, 2, 2), (2, 1, 4), (1, 4, 1)):
        if jax.device_count() < mesh[0] * mesh[1] * mesh[2]:
            continue
        for d_model, heads in ((24, 2), (32, 4), (40, 4)):
            args = _args("--mesh", ",".join(map(str, mesh)), "--d-model", str(d_model),
                         "--heads", str(heads), "--vocab", "7", "--batch", "8",
                         "--layers", "1")  # fmt: skip
            try:
                check_flags(args)
            except FlagError:
                continue
            m = shardlax.make_mesh(data=mesh[0], fsdp=mesh[1], model=mesh[2])
            cfg = TinyLMConfig(
                vocab=7, d_model=d_model, n_layers=1, n_heads=heads, d_ff=4 * d_model,
                vocab_multiple=math.lcm(8, mesh[1] * mesh[2]),
            )  # fmt: skip
            nnx.eval_shape(lambda m=m, cfg=cfg: TinyLM(cfg, mesh=m, rngs=nnx.Rngs(0)))
            built += 1
    assert built >= 3


def test_unwritable_out_is_found_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    match = r"^--out .*file/sub: the results folder cannot be created or written \(Not a direc"
    with pytest.raises(FlagError, match=match):
        check_out(str(blocker / "sub"))
    assert check_out(str(tmp_path / "new")) == str(tmp_path / "new")


def test_bad_flags_exit_2_with_one_line_on_stderr_before_jax_compiles():
    proc = _run("demo", "--steps", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == ["shardlax demo: --steps 0: the number of training steps must be at least 1. "
                     "Pass e.g. --steps 200."]  # fmt: skip


def test_unwritable_out_exits_2_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "out")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("shardlax demo: --out ") and "Traceback" not in err
    assert len(err.splitlines()) == 1 and out == ""


def test_processes_error_goes_to_stderr(capsys):
    assert main(["demo", "--mesh", "1,1,3", "--processes", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("shardlax demo: --processes 2: the mesh --mesh 1,1,3 has 3 devices")


def test_unknown_demo_flag_prints_the_demo_usage():
    proc = _run("demo", "--no-such-flag")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: python -m shardlax demo [-h]")
    assert "error: unrecognized arguments: --no-such-flag" in proc.stderr


def test_unparseable_values_are_argparse_errors_of_the_demo(capsys):
    for argv in (["--steps", "many"], ["--mesh", "2,2"], ["--model", "cnn"]):
        with pytest.raises(SystemExit) as e:
            main(["demo", *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: python -m shardlax demo" in err and argv[0] in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_layers=0), r"TinyLMConfig\(n_layers=0\): expected a positive int"),
        (dict(vocab=0), r"TinyLMConfig\(vocab=0\): expected a positive int"),
        (dict(d_model=-1), r"TinyLMConfig\(d_model=-1\)"),
        (dict(n_heads=0), r"TinyLMConfig\(n_heads=0\)"),
        (dict(n_kv_heads=0), r"TinyLMConfig\(n_kv_heads=0\): expected a positive int or None"),
        (dict(d_ff=0), r"TinyLMConfig\(d_ff=0\)"),
        (dict(seq_len=0), r"TinyLMConfig\(seq_len=0\)"),
        (dict(vocab_multiple=0), r"TinyLMConfig\(vocab_multiple=0\)"),
        (dict(n_layers=2.0), r"TinyLMConfig\(n_layers=2\.0\): expected a positive int"),
        (dict(n_heads=4, n_kv_heads=3), r"TinyLMConfig\(n_heads=4, n_kv_heads=3\): .*divide"),
        (dict(d_model=30, n_heads=4), r"TinyLMConfig\(d_model=30, n_heads=4\): .*head"),
        (dict(dropout=1.0), r"TinyLMConfig\(dropout=1\.0\): expected a rate in \[0, 1\)"),
        (dict(activation="relu"), r"TinyLMConfig\(activation='relu'\): expected one of"),
        (dict(rope_theta=0.0), r"TinyLMConfig\(rope_theta=0\.0\): expected a positive"),
    ],
)
def test_tinylm_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TinyLMConfig(**kwargs)
