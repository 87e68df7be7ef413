"""Scale-out by simulation: TinyLM ~1B and ~7B train steps on 64 and 256 simulated devices.

Each configuration is one `shardlax.plan` study in its own process (which asks
for its simulated devices before JAX starts): the Adam train step compiled
abstractly (nothing allocated) for shardlax's `Trainer`, for the constrained
GSPMD twin (plain jnp, the same parameter layout, `with_sharding_constraint` on
the residual stream, as MaxText writes it) and for one device. Per device:
arguments, temp, collectives and wire bytes per step, from the compiled
programs, not from a formula.

Goals (issue 13): arguments exactly 1/N of parameters + Adam state + batch;
temp <= 1.25x the ideal (the one-device temp over N); wire bytes <= the
constrained GSPMD twin's.

Run:
    python benchmarks/scaleout.py                  # 1b and 7b, fsdp on 64 and 256 devices
    python benchmarks/scaleout.py --quick          # tiny config on 8 and 16 devices
    python benchmarks/scaleout.py --publish        # write benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

# ----------------------------------------------------------------------------- config
PRESETS = ("1b", "7b")
DEVICES = (64, 256)
STRATEGY = "fsdp"
SEQ = 1024
SEQS_PER_DEVICE = 1
# -----------------------------------------------------------------------------


def one(preset: str, n: int, strategy: str, seq: int, batch: int, extra=()) -> dict:
    """One `python -m shardlax.plan` study in a fresh process; its JSON."""
    mesh = [f"fsdp={n}"] if strategy == "fsdp" else [f"fsdp={n // 8}", "model=8"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        argv = [sys.executable, "-m", "shardlax.plan", "--preset", preset, "--mesh", *mesh,
                "--strategy", strategy, "--batch", str(batch), "--seq", str(seq),
                "--json", str(out), *extra]  # fmt: skip
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[2:])} failed:\n{proc.stderr[-3000:]}")
        print(proc.stdout, flush=True)
        row = json.loads(out.read_text())
    row["wall_s"] = time.perf_counter() - t0
    row["preset"] = preset
    return row


def markdown(rows: list[dict], info: dict) -> str:
    def gib(x):
        return "-" if x is None else f"{x / 2**30:.3f}"

    def r(x):
        return "-" if x is None else f"{x:.3f}"

    out = [
        "# Scale-out by simulation: TinyLM train steps on simulated meshes",
        "",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, jax {info['jax']}, Python "
        f"{info['python']}; each configuration in its own process with as many simulated CPU "
        "devices as its mesh. Every figure is "
        "per device, read from a program compiled abstractly (`shardlax.plan`: "
        "`nnx.eval_shape`, `jax.eval_shape`, `ShapeDtypeStruct` batch, "
        "`compile().memory_analysis()`, `shardlax.audit`); nothing is allocated.",
        "",
        f"GSPMD baseline: the {C.GSPMD_BASELINE}: residual stream P(('data', 'fsdp'), None, "
        "None) after the embedding and every residual add; same parameter layout as shardlax.",
        "Ideal: arguments = (parameters + Adam state + batch) / N (scalars once); temp = the "
        "one-device program's temp / N. Adam, f32, one sequence per device.",
        "",
        C.md_table(
            [
                "model",
                "strategy, mesh",
                "batch x seq",
                "arguments GiB shardlax / GSPMD / ideal",
                "temp GiB shardlax / GSPMD / ideal",
                "wire GiB/step shardlax / GSPMD",
                "args/ideal",
                "temp/ideal",
                "wire/GSPMD",
                "compile s shardlax / GSPMD",
            ],
            [
                [
                    f"{row['params'] / 1e9:.2f}B ({row['preset']})",
                    f"{row['strategy']}, " + ",".join(f"{k}={v}" for k, v in row["mesh"].items()),
                    f"{row['batch']} x {row['seq']}",
                    f"{gib(row['shardlax']['arguments'])} / "
                    f"{gib(row['gspmd']['arguments'] if row['gspmd'] else None)} / "
                    f"{gib(row['ideal_arguments'])}",
                    f"{gib(row['shardlax']['temp'])} / "
                    f"{gib(row['gspmd']['temp'] if row['gspmd'] else None)} / "
                    f"{gib(row['ideal_temp'])}",
                    f"{gib(row['shardlax']['wire_bytes'])} / "
                    f"{gib(row['gspmd']['wire_bytes'] if row['gspmd'] else None)}",
                    r(row["goals"]["arguments_vs_ideal"]),
                    r(row["goals"]["temp_vs_ideal"]),
                    r(row["goals"]["wire_vs_gspmd"]),
                    f"{row['shardlax']['compile_s']:.1f} / "
                    f"{row['gspmd']['compile_s'] if row['gspmd'] else float('nan'):.1f}",
                ]
                for row in rows
            ],
        ),
        "",
        "Collectives per step (tensors, loops counted per trip):",
        "",
    ]
    for row in rows:
        g = row["gspmd"]["kinds"] if row["gspmd"] else {}
        out.append(
            f"- {row['preset']} on {row['devices']}: shardlax {row['shardlax']['kinds']}, GSPMD {g}"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--devices", type=int, nargs="+", default=None, help="default 64 256")
    p.add_argument("--strategy", default=STRATEGY, choices=("fsdp", "fsdp+tp"))
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--remat", action="store_true", help="TinyLMConfig(remat=True)")
    C.add_output_args(p)
    p.add_argument("--quick", action="store_true", help="tiny config on 8 and 16 devices")
    args = p.parse_args(argv)
    args.out = C.output_dir(args)
    if args.quick:
        args.presets, args.seq = ["tiny"], 32
    if args.devices is None:
        args.devices = [8, 16] if args.quick else list(DEVICES)
    C.setup_devices(1)  # this process only writes the report; the studies run apart
    info = C.machine_info()
    rows = []
    t0 = time.perf_counter()
    extra = ["--remat"] if args.remat else []
    for preset in args.presets:
        for n in args.devices:
            C.phase(f"{preset} on {n} devices ({args.strategy}): shardlax, GSPMD twin, 1 device")
            rows.append(one(preset, n, args.strategy, args.seq, n * SEQS_PER_DEVICE, extra))
            # written after each study: a long run leaves what it has
            C.write_results(args.out, "scaleout", rows, info, markdown)
    C.phase(f"wrote {args.out / 'scaleout.jsonl'}, {args.out / 'scaleout.md'} in "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
