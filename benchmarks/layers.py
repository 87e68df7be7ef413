"""Per-layer / per-train-step benchmark: shardlax (shard_map) vs GSPMD vs one device.

Each row is one training step (loss, gradients, optimizer update) of one
parallel strategy, built three ways:

  shardlax   the shardlax layers / strategy (`jax.shard_map`, every collective
             written by hand), on an Explicit mesh;
  gspmd      the same math written with plain `nnx.Linear` / `jnp`, jitted with
             its parameters and batch placed by `NamedSharding` on an Auto mesh,
             so XLA's sharding propagation (GSPMD) chooses the collectives;
  unsharded  the same plain model on one device.

The three start from the same parameter values (same `nnx.Rngs`) and inputs;
the losses they return are recorded to show they compute the same thing.
For each the script records trace+lower and compile time, the collectives of
the compiled HLO (`shardlax.audit`: count, kinds, bytes per device), the
per-device memory of `memory_analysis()` (arguments, temp), and step times
from interleaved runs (shardlax, gspmd, unsharded, shardlax, ...), all
after warm-up and compile, each waited on with `block_until_ready`. A
step-time ratio is the median of the per-round ratios (each round times the
three back to back, so slow drift of a shared machine cancels), with their
p10-p90 as its spread. Compile time (trace + lower + compile) is the median
of `--compile-repeats` cold compiles (`jax.clear_caches()` before each).

Meshes for n devices: tp_mlp model=n; fsdp_* fsdp=n; zero2 data=n; fsdp_tp
and tinylm fsdp=2, model=n/2 (fsdp=2, model=1 for n=2). One process asks for
max(--devices) simulated CPU devices; an n-device row uses the first n.

Theoretical minimum collectives per step (per device; n = devices on the
axis, B = local tokens, D = model width, F = hidden width, L = layers,
P = parameter bytes of the whole model, f32):

  tp_mlp      column -> row MLP, n-way tensor parallel, input not differentiated:
              forward 1 all-reduce of the activation [B, D] over 'model';
              backward none (dx of the column layer is not needed, dW is local).
  fsdp_deep   L scanned residual layers [D, D], fully sharded over 'fsdp',
              gathered on use and freed after the forward: per layer 2
              all-gathers of W (forward, and again in the backward for dx),
              1 of b, 1 reduce-scatter of each gradient; plus 1 scalar
              all-reduce of the loss. `fsdp_deep_remat`: the same model with
              each layer under `jax.checkpoint`; the recomputed forward needs
              b again (2 gathers of b), W still needs only 2 (the recompute
              and the backward can share one gather). `fully_shard_deep`:
              `shardlax.fsdp.fully_shard_scan` (flax's scan-over-layers
              pattern, each layer an FSDP unit, remat on), same minimum as
              `fsdp_deep_remat`.
  zero2       data-parallel MLP with Adam, gradients and optimizer state
              sharded over 'data' (ZeRO-2, `shardlax.train.Trainer`): 1
              reduce-scatter of the gradients (P bytes) + 1 all-gather of the
              updated parameters (P bytes) + 1 scalar all-reduce of the loss.
              (Plain data parallelism would all-reduce P: twice the wire bytes
              of the reduce-scatter.)
  fsdp_tp     column -> row MLP on a (fsdp=f, model=m) mesh, parameters gathered
              over 'fsdp' on use and freed after the forward: per parameter
              1 all-gather of its 1/m model shard in the forward, 1 more in
              the backward where the input gradient needs it (down.W only:
              the first layer's input is data), 1 reduce-scatter of its
              gradient; plus 1 all-reduce over 'model' of the activation
              [B/f, D] (forward) and 1 scalar all-reduce of the loss.
  tinylm      TinyLM train step (`shardlax.models.TinyLM`, FSDP x TP, blocks in
              a scan). Reference: what `TinyLM.declared_collectives` lists,
              blocks counted once per layer: per block the attention and MLP
              activation all-reduces over 'model' (forward) and input-gradient
              all-reduces (backward), FSDP gathers and reduce-scatters of
              every parameter, the vocabulary-parallel loss's 3 per-token
              all-reduces and the scalar mean. This is the design's own count,
              not a lower bound: GSPMD may undercut it.

A collective inside a `lax.scan` appears once in the HLO; the "executed"
bytes multiply it by the row's loop trip count.

Run:
    python benchmarks/layers.py                  # every row, 2, 4 and 8 devices
    python benchmarks/layers.py --rows tp_mlp --devices 8 --repeats 30
    python benchmarks/layers.py --quick          # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import jax
import jax.numpy as jnp

import _common as C
from _layers_report import markdown, plot
from _rows import ROWS, SIZES
from _steps import Row, Skip
from shardlax import audit

# ----------------------------------------------------------------------------- config
DEVICES = (2, 4, 8)
REPEATS = 30
WARMUP = 2
COMPILE_REPEATS = 3
# -----------------------------------------------------------------------------

# ----------------------------------------------------------------------------- measure


class Runner:
    """Calls a compiled step, carrying its (donated) state into the next call."""

    def __init__(self, compiled, state, batch):

        # Fresh buffers: optax may share one zeros buffer between state leaves,
        # which donation cannot take twice.
        self.state = jax.tree.map(jnp.copy, state)
        self.compiled, self.batch = compiled, batch

    def __call__(self):
        self.state, out = self.compiled(self.state, self.batch)
        return out

    @staticmethod
    def loss(out):
        return out["loss"] if isinstance(out, dict) else out


def compile_timed(fn, args):
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def collectives_summary(report, loop_trips: int) -> dict:
    """Counts and bytes of a `shardlax.audit` report, collectives in loops once per trip.

    Trip counts come from the audit (the HLO's known trip counts); an audit
    without them falls back to the row's `loop_trips` for collectives in a loop.
    """
    trips = [getattr(c, "trips", None) or (loop_trips if c.in_loop else 1) for c in report]
    kinds: dict[str, int] = {}
    for c, t in zip(report, trips, strict=True):
        kinds[c.kind] = kinds.get(c.kind, 0) + c.operands * t
    return {
        "hlo_ops": len(report),
        "tensors": sum(c.operands * t for c, t in zip(report, trips, strict=True)),
        "hlo_tensors": sum(c.operands for c in report),
        "kinds": kinds,
        "bytes": sum(c.bytes for c in report),
        "wire_bytes": sum(c.wire_bytes for c in report),
        "executed_bytes": sum(c.bytes * t for c, t in zip(report, trips, strict=True)),
        "executed_wire_bytes": sum(c.wire_bytes * t for c, t in zip(report, trips, strict=True)),
        "list": [
            {"kind": c.kind, "axes": list(c.axes), "dtype": c.dtype, "bytes": c.bytes,
             "operands": c.operands, "in_loop": c.in_loop}
            for c in report
        ],
    }  # fmt: skip


def measure(row: Row, args) -> list[dict]:
    info = C.machine_info()
    meta, runners, hlo = {}, {}, {}
    # Cold compiles, interleaved: caches cleared before each, so no candidate
    # profits from another's traced or compiled pieces; medians over rounds.
    compiles: dict[str, list[tuple]] = {impl: [] for impl in row.candidates}
    C.phase(f"{row.name} n={row.config['n']}: {args.compile_repeats} cold compile(s) each")
    for r in range(args.compile_repeats):  # the order rotated per round, as the timed rounds
        for impl in C.rotated(row.candidates, r):
            cand = row.candidates[impl]
            jax.clear_caches()
            compiles[impl].append(compile_timed(cand.fn, (cand.state, cand.batch)))
    for impl, cand in row.candidates.items():
        c = compiles[impl][-1][0]
        t_lower = statistics.median(t[1] for t in compiles[impl])
        t_compile = statistics.median(t[2] for t in compiles[impl])
        mem = c.memory_analysis()
        report = audit.parse_hlo(c.as_text(), cand.mesh)
        runners[impl] = Runner(c, cand.state, cand.batch)
        loss = float(jax.device_get(runners[impl].loss(runners[impl]())))
        meta[impl] = {
            "lower_s": t_lower,
            "compile_s": t_compile,
            "memory": {
                "arguments": int(mem.argument_size_in_bytes),
                "outputs": int(mem.output_size_in_bytes),
                "temp": int(mem.temp_size_in_bytes),
                "alias": int(mem.alias_size_in_bytes),
            },
            "collectives": collectives_summary(report, row.loop_trips),
            "loss": loss,
        }
        hlo[impl] = C.hlo_instructions(c.as_text())
    C.phase(f"{row.name} n={row.config['n']}: {args.repeats} interleaved timed rounds")
    times = C.interleaved(runners, args.repeats, args.warmup)
    mins = row.minimum
    min_bytes = sum(m["bytes"] * m["count"] for m in mins)
    min_wire = sum(m["wire_bytes"] * m["count"] for m in mins)
    rows = []
    for impl in row.candidates:
        st = C.summarize(times[impl])
        r = {
            "bench": "layers",
            "row": row.name,
            "devices": row.config["n"],
            "strategy": row.strategy,
            "impl": impl,
            "mesh": row.mesh if impl != "unsharded" else "1 device",
            "config": row.config,
            **st,
            "spread": (st["p90_s"] - st["p10_s"]) / st["median_s"],
            **meta[impl],
            "minimum": mins,
            "minimum_tensors": sum(m["count"] for m in mins),
            "reference": row.reference,
            "gspmd_baseline": row.baseline,
            "minimum_bytes": min_bytes,
            "minimum_wire_bytes": min_wire,
            "loop_trips": row.loop_trips,
            "process": f"one process, {info['device_count']} simulated devices",
            "note": C.SHORT_NOTE,
            "machine": info,
        }
        for other in ("gspmd", "unsharded"):
            if impl == "shardlax" and other in times:
                per_round = [a / b for a, b in zip(times["shardlax"], times[other], strict=True)]
                # The median of per-round ratios: each round times the candidates back
                # to back, so slow drift of the machine cancels within a round.
                r[f"ratio_vs_{other}"] = statistics.median(per_round)
                r[f"ratio_of_medians_vs_{other}"] = st["median_s"] / statistics.median(times[other])
                r[f"ratio_vs_{other}_p10"] = C.percentile(per_round, 10)
                r[f"ratio_vs_{other}_p90"] = C.percentile(per_round, 90)
                c_self = meta["shardlax"]["lower_s"] + meta["shardlax"]["compile_s"]
                c_other = meta[other]["lower_s"] + meta[other]["compile_s"]
                r[f"compile_ratio_vs_{other}"] = c_self / c_other
        if impl == "shardlax" and "gspmd" in hlo:
            # Few differing instructions: the two programs are the same computation,
            # and a time difference is dispatch or noise.
            r["hlo_instructions"] = len(hlo["shardlax"])
            r["hlo_differing_vs_gspmd"] = C.hlo_difference(hlo["shardlax"], hlo["gspmd"])
        rows.append(r)
        col = r["collectives"]
        print(
            f"{row.name:10s} n={row.config['n']} {impl:9s} median {C.fmt_time(r['median_s']):>9s} "
            f"spread {r['spread']:4.2f} compile {r['lower_s'] + r['compile_s']:.2f}s "
            f"collectives {col['tensors']} {col['kinds']} {C.fmt_bytes(col['executed_bytes'])} "
            f"(min {C.fmt_bytes(min_bytes)}) temp {C.fmt_bytes(r['memory']['temp'])} "
            f"loss {r['loss']:.6f}",
            flush=True,
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="device counts; each row runs on a mesh of each")  # fmt: skip
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--set", nargs="*", default=[], metavar="ROW.KEY=INT",
                   help="override a size, e.g. tp_mlp.batch=512")  # fmt: skip
    C.add_output_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 repeats")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--strict", action="store_true", help="stop at the first failing row")
    p.add_argument("--compile-repeats", type=int, default=COMPILE_REPEATS,
                   help="cold compiles per candidate (median)")  # fmt: skip
    args = p.parse_args(argv)
    args.out = C.output_dir(args)
    if args.quick:
        args.repeats, args.warmup, args.compile_repeats = 2, 1, 1
    if args.devices is None:
        args.devices = [4] if args.quick else list(DEVICES)
    sizes = {k: dict(v[1] if args.quick else v[0]) for k, v in SIZES.items()}
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        sizes[name][field] = int(value)
    C.setup_devices(max(args.devices))

    t0 = time.perf_counter()
    rows, skipped = [], {}
    for n in args.devices:
        for name in args.rows:
            builder = ROWS.get(name)
            if builder is None:
                skipped[name] = "no row function yet (its shardlax feature has not landed)"
                print(f"{name:10s} skipped: {skipped[name]}")
                continue
            try:
                C.phase(f"{name} n={n}: build the three candidates")
                row = builder(sizes[name], n, jax.devices()[:n])
                rows += measure(row, args)
            except Skip as e:
                skipped[name] = str(e)
                print(f"{name:10s} skipped: {e}")
            except Exception as e:  # a row that breaks must not cost the others
                if args.strict:
                    raise
                skipped[f"{name} (n={n})"] = f"failed: {type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"{name:10s} n={n} FAILED: {type(e).__name__}: {e}")
    C.phase(f"write {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_jsonl(args.out / "layers.jsonl", rows)
    (args.out / "layers.md").write_text(markdown(rows, skipped))
    written = ["layers.jsonl", "layers.md"]
    if rows and not args.no_plot and C.have_matplotlib():
        plot(rows, args.out / "layers.png")
        written.append("layers.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)} in "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(C.SIMULATED_NOTE)


if __name__ == "__main__":
    main()
