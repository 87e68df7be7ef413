"""The demo's flag checks (`python -m shardlax demo`), run before JAX starts.

`check_flags` holds every rule the flags must follow, in flag terms; a broken
rule raises `FlagError` naming the flag, the value, the rule and a fix, which
the command line prints as one line on stderr (exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile

from shardlax._launch import FlagError


def _fail(flag: str, value, rule: str, fix: str) -> FlagError:
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return FlagError(f"{flag} {shown}: {rule}. {fix}")


def _at_least(args, name: str, low: int, what: str, example: int) -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if value < low:
        raise _fail(name, value, f"{what} must be at least {low}", f"Pass e.g. {name} {example}.")


def _finite(args, name: str, what: str, *, positive: bool, example: str) -> None:
    value = getattr(args, name.lstrip("-").replace("-", "_"))
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        rule = f"{what} must be a finite number {'> 0' if positive else '>= 0'}"
        raise _fail(name, value, rule, f"Pass e.g. {name} {example}.")


def _up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def check_flags(args: argparse.Namespace) -> None:
    """Every rule the demo's flags must follow, in flag terms; raises FlagError.

    These are the rules the layers would enforce later (at construction or
    trace time, in their own argument names) plus the demo's own, checked
    before JAX starts so a bad value costs nothing.
    """
    data, fsdp, model = args.mesh
    mesh_text = f"--mesh {data},{fsdp},{model}"
    n_dev = data * fsdp * model
    batch_split = data * fsdp
    for name, what, example in (
        ("--steps", "the number of training steps", 200),
        ("--batch", "the global batch (sequences per step)", 16),
        ("--seq-len", "the tokens per sequence", 32),
        ("--d-model", "the model width", 64),
        ("--layers", "the number of transformer blocks", 2),
        ("--heads", "the number of attention heads", 4),
        ("--log-every", "the printing interval", 20),
        ("--processes", "the number of processes", 1),
    ):
        _at_least(args, name, 1, what, example)
    _at_least(args, "--kv-heads", 0, "the number of key/value heads (0: as many as --heads)", 0)
    _at_least(args, "--d-ff", 0, "the MLP width (0: 4 x --d-model)", 0)
    _at_least(args, "--exact-steps", 0, "the number of steps checked for exact agreement", 5)
    _at_least(args, "--vocab", 2, "the vocabulary size", 64)
    _at_least(args, "--order", 2, "the n of the n-gram language (each token depends on n-1)", 2)
    if not 0 <= args.seed < 2**32:
        raise _fail("--seed", args.seed, "the seed must be in [0, 2**32)", "Pass e.g. --seed 0.")
    _finite(args, "--lr", "the learning rate", positive=True, example="1e-2")
    _finite(args, "--weight-decay", "the weight decay", positive=False, example="0.01")
    _finite(args, "--drift-factor", "the drift factor", positive=True, example="10")
    _finite(args, "--timeout", "the timeout in seconds", positive=True, example="600")
    if args.drift_factor < 1:
        raise _fail(
            "--drift-factor", args.drift_factor,
            "the sharded run is compared with the drift that rounding alone causes, so a "
            "factor below 1 would reject a run as correct as the reference",
            "Pass e.g. --drift-factor 10.",
        )  # fmt: skip
    if not 1 <= args.branching <= args.vocab:
        raise _fail(
            "--branching", args.branching,
            f"the tokens that may follow a context must be between 1 and --vocab {args.vocab}",
            f"Pass e.g. --branching {min(4, args.vocab)}.",
        )  # fmt: skip
    if args.vocab**args.order > 2**24:
        raise _fail(
            "--vocab", args.vocab,
            f"with --order {args.order} the language's transition table has "
            f"{args.vocab**args.order:,} entries (limit 2**24)",
            "Use a smaller --vocab or --order.",
        )  # fmt: skip
    if args.processes > 1 and n_dev % args.processes:
        raise _fail(
            "--processes", args.processes,
            f"the mesh {mesh_text} has {n_dev} devices, which {args.processes} processes cannot "
            f"share evenly",
            f"Choose --processes among the divisors of {n_dev}, or a mesh whose size is a "
            f"multiple of {args.processes}.",
        )  # fmt: skip
    if args.batch % batch_split:
        raise _fail(
            "--batch", args.batch,
            f"the batch is split over the data and fsdp axes of {mesh_text} ({data} x {fsdp} = "
            f"{batch_split} parts), and {batch_split} does not divide {args.batch}",
            f"Use --batch {_up(args.batch, batch_split)}, or a mesh whose data x fsdp divides "
            f"{args.batch}.",
        )  # fmt: skip
    d, heads = args.d_model, args.heads
    d_ff = args.d_ff or 4 * d
    if d % fsdp:
        raise _fail(
            "--d-model", d,
            f"FSDP splits every weight over the fsdp axis of {mesh_text} (size {fsdp}), "
            f"and {fsdp} does not divide {d}",
            f"Use --d-model {_up(d, fsdp)}, or a mesh whose fsdp size divides {d}.",
        )  # fmt: skip
    if d_ff % model:
        flag, value = ("--d-ff", args.d_ff) if args.d_ff else ("--d-model", d)
        raise _fail(
            flag, value,
            f"the MLP width {d_ff}{'' if args.d_ff else ' (4 x --d-model)'} is split over the "
            f"model axis of {mesh_text} (size {model}), and {model} does not divide {d_ff}",
            f"Use a {flag} for which the MLP width is a multiple of {model}, or a mesh whose "
            f"model size divides {d_ff}.",
        )  # fmt: skip
    check_checkpoint_flags(args)
    if args.model == "mlp":
        return
    kv = args.kv_heads or heads
    if heads % model:
        raise _fail(
            "--heads", heads,
            f"attention heads are split over the model axis of {mesh_text} (size {model}), "
            f"and {model} does not divide {heads}",
            f"Use --heads {_up(heads, model)}, or a mesh whose model size divides {heads}.",
        )  # fmt: skip
    if heads % kv:
        raise _fail(
            "--kv-heads", args.kv_heads,
            f"grouped-query attention shares each key/value head among --heads/--kv-heads "
            f"query heads, so --kv-heads must divide --heads {heads}",
            f"Choose --kv-heads among the divisors of {heads} (0: {heads}).",
        )  # fmt: skip
    if kv % model:
        raise _fail(
            "--kv-heads", args.kv_heads,
            f"key/value heads are split over the model axis of {mesh_text} (size {model}), "
            f"and {model} does not divide {kv}",
            f"Use --kv-heads {_up(kv, model)} (or 0: as many as --heads), or a mesh whose "
            f"model size divides {kv}.",
        )  # fmt: skip
    if d % heads or (d // heads) % 2:
        good = _up(d, 2 * heads)
        raise _fail(
            "--d-model", d,
            f"each of the --heads {heads} attention heads gets --d-model/--heads features, "
            f"which must be a whole, even number (rotary embeddings rotate pairs of features)",
            f"Use --d-model {good} ({good // heads} per head), or --heads dividing {d} with an "
            f"even quotient.",
        )  # fmt: skip
    if args.sequence_parallel and args.seq_len % model:
        raise _fail(
            "--seq-len", args.seq_len,
            f"--sequence-parallel splits the sequence over the model axis of {mesh_text} "
            f"(size {model}), and {model} does not divide {args.seq_len}",
            f"Use --seq-len {_up(args.seq_len, model)}, or drop --sequence-parallel.",
        )  # fmt: skip


def check_checkpoint_flags(args: argparse.Namespace) -> None:
    """--save / --resume: the LM demo only; a resume folder must hold a demo checkpoint."""
    for flag, value in (("--save", args.save), ("--resume", args.resume)):
        if value is not None and args.model != "lm":
            raise _fail(flag, value, "only the TinyLM demo saves and resumes",
                        f"Drop {flag}, or use --model lm.")  # fmt: skip
    if args.resume is not None:
        if args.processes > 1:
            raise _fail("--resume", args.resume, "resuming runs in one process",
                        "Drop --processes, or drop --resume.")  # fmt: skip
        for part in ("model", "optimizer"):
            where = os.path.join(args.resume, part)
            marks = ("shardlax_checkpoint.json", "_CHECKPOINT_METADATA")  # training / model
            if not any(os.path.isfile(os.path.join(where, m)) for m in marks):
                raise _fail(
                    "--resume", args.resume,
                    f"no demo checkpoint there ({os.path.join(args.resume, part)} is not a "
                    f"shardlax checkpoint)",
                    "Pass the folder a run with --save DIR wrote.",
                )  # fmt: skip
    if args.save is not None:
        for part in ("model", "optimizer"):
            where = os.path.join(args.save, part)
            if os.path.isdir(where) and os.listdir(where):
                raise _fail(
                    "--save", args.save, f"{where} already holds files",
                    "Pass --save a new or empty folder.",
                )  # fmt: skip
        try:
            os.makedirs(args.save, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=args.save, prefix=".shardlax-probe-"):
                pass
        except OSError as e:
            raise _fail("--save", args.save,
                        f"the folder cannot be created or written ({e.strerror or e})",
                        "Pass --save a folder you can write to.") from None  # fmt: skip


def check_out(out: str) -> str:
    """Create `out` and prove it writable now, not after training; returns its absolute path."""
    path = os.path.abspath(out)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".shardlax-probe-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise _fail(
            "--out", out,
            f"the results folder cannot be created or written ({reason})",
            "Pass --out a folder you can write to, e.g. --out ./shardlax-demo.",
        ) from None  # fmt: skip
    return path


def _parse_worker(text: str) -> tuple[int, int, str, int]:
    try:
        pid, count, host, port, devices = text.replace(":", ",").split(",")
        return int(pid), int(count), f"{host}:{int(port)}", int(devices)
    except ValueError:
        raise _fail(
            "--worker", text, "expected PID,COUNT,HOST:PORT,DEVICES (set by --processes)",
            "Do not pass --worker yourself; use --processes N.",
        ) from None  # fmt: skip
