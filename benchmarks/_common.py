"""What the benchmark scripts share: device setup, timing, machine info, output files.

Nothing here imports JAX at module level, so a script can ask for its simulated
CPU devices (`setup_devices`) before JAX creates a backend.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The committed, published results: written only with `--publish` (or an explicit `--out`).
PUBLISHED = Path(__file__).resolve().parent / "results"
#: Where a run writes by default: outside the repository, never over the published files.
DEFAULT_OUT = Path(os.environ.get("TMPDIR", "/tmp")) / "shardlax-benchmarks"

#: The GSPMD baseline every report names: the best a careful user writes.
GSPMD_BASELINE = (
    "constrained GSPMD twin: plain nnx/jnp, parameters and batch placed by NamedSharding, "
    "with_sharding_constraint on the residual stream / activations (as MaxText writes it)"
)


def add_output_args(parser) -> None:
    """`--out DIR` / `--publish`: where results go (default: outside the repository)."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output directory (default {DEFAULT_OUT})")  # fmt: skip
    parser.add_argument("--publish", action="store_true",
                        help=f"write the published results in {PUBLISHED}")  # fmt: skip


def output_dir(args) -> Path:
    """The directory a run writes to; a `--quick` run never writes the published results."""
    if args.publish and args.out is not None:
        raise SystemExit("--publish writes benchmarks/results/; drop --out, or drop --publish.")
    out = PUBLISHED if args.publish else (args.out or DEFAULT_OUT)
    if getattr(args, "quick", False) and out.resolve() == PUBLISHED.resolve():
        raise SystemExit(
            f"--quick never overwrites the published results in {PUBLISHED}: use --out DIR "
            f"(or the default {DEFAULT_OUT}), or run without --quick to publish."
        )
    return out


def phase(msg: str) -> None:
    """Print one progress line, flushed (benchmarks report each phase as it starts)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


SIMULATED_NOTE = (
    "Simulated CPU devices (XLA host platform) share one memory system and the same "
    "cores: a collective between them is a memory copy, so aggregate bus bandwidth is "
    "bounded by the memcpy ceiling measured in the same run. Absolute times mean little; "
    "ratios, collective bytes and memory are what transfer to accelerators."
)

SHORT_NOTE = "simulated CPU devices sharing one memory system: read ratios, bytes, memory"


def setup_devices(n: int) -> None:
    """Ask for `n` simulated CPU devices; must run before JAX creates a backend."""
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    jax.config.update("jax_platforms", "cpu")


def machine_info() -> dict:
    """Platform, CPU count, Python / JAX / jaxlib / flax versions, device kind."""
    import jax
    import jaxlib

    try:
        import flax

        flax_version = flax.__version__
    except ImportError:  # pragma: no cover
        flax_version = None
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax_version,
        "backend": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, `q` in [0, 100] (numpy's default method)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(times: Sequence[float]) -> dict:
    """Median, p10, p90, min, max and count of a list of seconds."""
    return {
        "median_s": statistics.median(times),
        "p10_s": percentile(times, 10),
        "p90_s": percentile(times, 90),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds for one call of `fn()`, waiting for every output."""
    import jax

    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def interleaved(
    fns: dict[str, Callable[[], Any]], iters: int, warmup: int
) -> dict[str, list[float]]:
    """Time every `fn()` in turn, rotating the order each round (A B C, B C A, C A B, ...).

    Interleaving spreads the drift of a shared machine (other processes,
    frequency changes) over every candidate instead of biasing whichever ran
    last; compare the medians, or the per-round ratios. The rotation gives
    every candidate every position equally often: on simulated CPU devices
    the program that runs right after the one-device candidate pays for
    waking the idle device threads (measured on TinyLM at 8 devices: a fixed
    order shardlax, GSPMD, one device put shardlax at 1.08-1.10x GSPMD, the
    rotated order at 1.00-1.03x, the same compiled programs).
    """
    for _ in range(warmup):
        for fn in fns.values():
            time_call(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(iters):
        for name in rotated(fns, r):
            times[name].append(time_call(fns[name]))
    return times


def rotated(names: Sequence[str], r: int) -> list[str]:
    """`names` in round `r`'s order: rotated by `r`, so each takes every position in turn."""
    names = list(names)
    return names[r % len(names) :] + names[: r % len(names)]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")


def mlp_block(d: int) -> type:
    """The deep-stack benchmarks' block class: `x + W2 gelu(W1 x)`, d -> 4d -> d (plain nnx)."""
    import jax
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            return x + self.down(jax.nn.gelu(self.up(x)))

    return Block


def write_results(out: Path, name: str, rows: list[dict], info: dict, markdown: Callable) -> None:
    """`<out>/<name>.jsonl` (the rows, each with the machine), `<out>/<name>.md` (`markdown`)."""
    for row in rows:
        row["machine"] = info
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / f"{name}.jsonl", rows)
    (out / f"{name}.md").write_text(markdown(rows, info))


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown table; `align` is one char per column: 'l' or 'r' (default 'r')."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} GiB"  # pragma: no cover


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def machine_line(info: dict) -> str:
    return (
        f"{info['platform']}, {info['cpu_count']} CPUs "
        f"({info['cpu_affinity']} usable), {info['device_count']} simulated "
        f"{info['backend']} devices ({info['device_kind']}), jax {info['jax']}, "
        f"Python {info['python']}"
    )


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def hlo_instructions(text: str) -> list[str]:
    """The instructions of a compiled HLO module, canonical and sorted, for comparing programs.

    Source metadata, instruction and computation names and parameter labels
    are dropped, so two programs that differ only in how they were written
    (a `shardlax.kernels` wrapper vs the `jax.lax` call it wraps) compare equal.
    """
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    out = []
    for line in text.splitlines():
        if line.startswith("HloModule"):
            continue
        if re.match(r"^\s*(ROOT\s+)?%?[\w.\-]+ = ", line) or ("{" in line and "->" in line):
            line = re.sub(r"%[\w.\-]+", "%_", line)
            line = re.sub(r"^\s*(ROOT\s+)?[\w.\-]+ = ", r"\1_ = ", line)
            line = re.sub(r"[\w.\-]+: ", "", line)  # parameter labels in headers
            line = re.sub(r"^\s*(ENTRY\s+)?[\w.\-]+ \(", r"\1_ (", line)
            line = re.sub(r"(to_apply|calls|body|condition)=\S+", r"\1=_", line)
            out.append(line.strip())
    return sorted(out)


def hlo_difference(a: list[str], b: list[str]) -> int:
    """How many canonical instructions of `a` have no equal in `b` (and vice versa, the max)."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    return max(sum((ca - cb).values()), sum((cb - ca).values()))
