"""Microbenchmark of each collective: shardlax.kernels vs raw jax.lax, with a memcpy ceiling.

For every collective (psum, tiled all_gather, tiled psum_scatter, ppermute as
a ring shift, all_to_all), device count n and message size S, the script
compiles `jax.jit(jax.shard_map(body))` twice -- the body calling the
`shardlax.kernels` wrapper and the body calling `jax.lax` directly -- and a
plain copy of the same per-device size on the same n devices (the ceiling).
The three are timed interleaved (A B C A B C ...) after warm-up, each call
waited on with `block_until_ready`; compile time is measured apart.

Sizes follow nccl-tests: S is the larger of the per-device input and output
buffers (all-reduce: the buffer; all-gather: the gathered output;
reduce-scatter: the unscattered input; all-to-all, permute: the buffer).

    algbw = S / t
    busbw = algbw * 2(n-1)/n   all-reduce
          = algbw * (n-1)/n    all-gather, reduce-scatter, all-to-all
          = algbw              permute (send/recv)

busbw is per device; the aggregate over all n devices is n * busbw. The
ceiling is a memcpy of S bytes on each of the n devices at once (aggregate
n * S / t_copy); `agg_busbw / ceiling` is the fraction of the machine's copy
bandwidth the collective reaches. Simulated CPU devices share one memory
system, so that fraction, not the GB/s, is the figure to read. The bytes of
every compiled program are read back with `shardlax.audit` and checked
against S, and the compiled instructions of the shardlax and jax.lax
programs are compared (they are identical when the wrapper costs nothing).

One process with max(--devices) simulated CPU devices; the n-device
benchmarks run on sub-meshes of its first n devices. `--max-size 64M` adds
32 and 64 MiB; there, on this kind of machine, fresh output buffers
page-fault on first touch and the times measure that more than copying.

Run:
    python benchmarks/collectives.py                 # 2, 4, 8 devices, 64 KiB..16 MiB
    python benchmarks/collectives.py --max-size 64M  # up to 64 MiB
    python benchmarks/collectives.py --quick         # smoke run (seconds)

References:
  NVIDIA nccl-tests, doc/PERFORMANCE.md (algbw and busbw).
  AI-Hypercomputer/accelerator-microbenchmarks, collectives.py.
"""

from __future__ import annotations

import argparse
import functools
import time

import _common as C
from _collectives_report import COLLECTIVES, HLO_KIND, markdown, plot

# ----------------------------------------------------------------------------- config
DEVICES = (2, 4, 8)
MIN_SIZE = 64 * 1024
MAX_SIZE = 16 * 1024 * 1024
ITERS = 50
WARMUP = 3
AXIS = "x"
# -----------------------------------------------------------------------------


def bus_factor(name: str, n: int) -> float:
    """nccl-tests busbw / algbw."""
    if name == "psum":
        return 2 * (n - 1) / n
    if name == "ppermute":
        return 1.0
    return (n - 1) / n


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def sizes_between(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def bodies(name: str, n: int):
    """(shardlax body, raw jax.lax body, local input elements per S/4 output elements)."""
    import jax.lax as lax

    from shardlax import kernels as K

    ring = [(i, (i + 1) % n) for i in range(n)]
    if name == "psum":
        return (lambda x: K.all_reduce(x, AXIS)), (lambda x: lax.psum(x, AXIS)), 1
    if name == "all_gather":
        return (
            lambda x: K.all_gather(x, AXIS, axis=0, invariant=False),
            lambda x: lax.all_gather(x, AXIS, axis=0, tiled=True),
            n,  # input is S/n
        )
    if name == "psum_scatter":
        return (
            lambda x: K.reduce_scatter(x, AXIS, axis=0),
            lambda x: lax.psum_scatter(x, AXIS, scatter_dimension=0, tiled=True),
            1,
        )
    if name == "ppermute":
        return (lambda x: K.ring_shift(x, AXIS, n)), (lambda x: lax.ppermute(x, AXIS, ring)), 1
    if name == "all_to_all":
        return (
            lambda x: K.all_to_all(x, AXIS, split_axis=0, concat_axis=0),
            lambda x: lax.all_to_all(x, AXIS, 0, 0, tiled=True),
            1,
        )
    raise ValueError(f"unknown collective {name!r}; expected one of {COLLECTIVES}")


def compile_timed(fn, x):
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(x)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from shardlax import audit

    info = C.machine_info()
    sizes = sizes_between(args.min_size, args.max_size, args.factor)
    rows: list[dict] = []
    for n in args.devices:
        mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
        sharding = NamedSharding(mesh, P(AXIS))
        for size in sizes:
            C.phase(f"{n} devices, {size:,} bytes per device: memcpy ceiling, then each collective")
            elems = size // 4  # f32
            # The ceiling: each of the n devices copies S bytes at once.
            x_full = jax.device_put(jnp.arange(n * elems, dtype=jnp.float32), sharding)
            copy, _, copy_compile = compile_timed(jnp.copy, x_full)
            for name in args.collectives:
                k_body, lax_body, div = bodies(name, n)
                x = (
                    x_full
                    if div == 1
                    else jax.device_put(jnp.arange(n * elems // div, dtype=jnp.float32), sharding)
                )
                fns, meta, hlo = {}, {}, {}
                for impl, body in (("shardlax", k_body), ("lax", lax_body)):
                    f = jax.shard_map(body, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
                    compiled, t_lower, t_compile = compile_timed(f, x)
                    report = audit.parse_hlo(compiled.as_text(), mesh)
                    fns[impl] = functools.partial(compiled, x)
                    meta[impl] = (t_lower, t_compile, report)
                    hlo[impl] = C.hlo_instructions(compiled.as_text())
                fns["memcpy"] = functools.partial(copy, x_full)
                times = C.interleaved(fns, args.iters, args.warmup)
                ceiling = size / C.summarize(times["memcpy"])["median_s"]  # per device
                for impl in ("shardlax", "lax"):
                    t_lower, t_compile, report = meta[impl]
                    st = C.summarize(times[impl])
                    algbw = size / st["median_s"]
                    busbw = algbw * bus_factor(name, n)
                    kinds = [c.kind for c in report]
                    audit_bytes = sum(c.bytes for c in report)
                    rows.append(
                        {
                            "bench": "collectives",
                            "collective": name,
                            "impl": impl,
                            "devices": n,
                            "size_bytes": size,
                            "dtype": "f32",
                            **st,
                            "p90_over_median": st["p90_s"] / st["median_s"],
                            "algbw_GBps": algbw / 1e9,
                            "busbw_GBps": busbw / 1e9,
                            "agg_busbw_GBps": n * busbw / 1e9,
                            "ceiling_agg_GBps": n * ceiling / 1e9,
                            "agg_busbw_over_ceiling": busbw / ceiling,
                            "memcpy": C.summarize(times["memcpy"]),
                            "memcpy_compile_s": copy_compile,
                            "lower_s": t_lower,
                            "compile_s": t_compile,
                            "wire_bytes_per_device": size * bus_factor(name, n),
                            "audit_kinds": kinds,
                            "audit_bytes": audit_bytes,
                            "audit_wire_bytes": sum(c.wire_bytes for c in report),
                            "audit_ok": kinds == [HLO_KIND[name]] and audit_bytes == size,
                            "same_hlo_as_lax": hlo["shardlax"] == hlo["lax"],
                            "mesh": "one process, sub-mesh of the first n of "
                            f"{info['device_count']} simulated devices",
                            "note": C.SHORT_NOTE,
                            "machine": info,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{name:13s} {impl:8s} n={n} S={C.fmt_bytes(size):>9s} "
                        f"median {C.fmt_time(r['median_s']):>9s} p90 {C.fmt_time(r['p90_s']):>9s} "
                        f"busbw {r['busbw_GBps']:6.2f} GB/s agg/ceiling "
                        f"{r['agg_busbw_over_ceiling']:5.2f} "
                        f"audit {'ok' if r['audit_ok'] else 'MISMATCH'}",
                        flush=True,
                    )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=list(DEVICES))
    p.add_argument("--min-size", type=parse_size, default=MIN_SIZE, help="e.g. 64K")
    p.add_argument("--max-size", type=parse_size, default=MAX_SIZE, help="e.g. 16M, 64M")
    p.add_argument("--factor", type=int, default=2, help="size step (default x2)")
    p.add_argument("--iters", type=int, default=ITERS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--collectives", nargs="+", default=list(COLLECTIVES), choices=COLLECTIVES)
    C.add_output_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 and 4 devices")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.out = C.output_dir(args)
    if args.quick:
        args.devices, args.min_size, args.max_size = [2, 4], 64 * 1024, 128 * 1024
        args.iters, args.warmup = 3, 1
    C.setup_devices(max(args.devices))
    t0 = time.perf_counter()
    rows = run(args)
    C.phase(f"write {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    C.write_jsonl(args.out / "collectives.jsonl", rows)
    (args.out / "collectives.md").write_text(markdown(rows))
    written = ["collectives.jsonl", "collectives.md"]
    if not args.no_plot and C.have_matplotlib():
        plot(rows, args.out / "collectives.png")
        written.append("collectives.png")
    print(
        f"wrote {', '.join(str(args.out / w) for w in written)} in {time.perf_counter() - t0:.0f} s"
    )
    print(C.SIMULATED_NOTE)


if __name__ == "__main__":
    main()
