"""Lowering and compile time of an unrolled stack of L `fully_shard` blocks vs GSPMD.

Identical units are traced once (`shardlax._trace_cache`: the first unit's
shard_map kept as a jaxpr and bound through one `jax.jit` for every later
unit, whose linearization and transpose JAX then caches too), so lowering
grows with the number of *distinct* blocks, not with depth. Each block is
`x + W2 gelu(W1 x)` (d -> 4d -> d); a row times, cold (`jax.clear_caches()`
and the trace store cleared before each), the lowering (`.lower`: tracing,
autodiff, StableHLO) and the XLA compile of a gradient step:

- `shardlax`: the units called under `nnx.jit` (each its own shard_map),
- `shardlax, no replay`: the same with the trace store disabled (every unit
  traced, as before it existed),
- `trainer`: one Adam step of `shardlax.Trainer(strategy="fsdp")` (the units
  inside the step's shard_map),
- `gspmd`: plain nnx under `jax.jit`, parameters placed `P('fsdp', None)`,
  batch `P('fsdp')`.

Medians over `--repeats` rounds, the candidates' order rotated per round.

Run:
    python benchmarks/tracing.py              # L = 4, 16, 48; d = 64; 8 devices
    python benchmarks/tracing.py --quick      # L = 2, 4 (seconds)
    python benchmarks/tracing.py --publish    # write benchmarks/results/
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C

DEVICES = 8
DEPTHS = (4, 16, 48)
D = 64
BATCH = 32


def candidates(layers: int, d: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardlax
    from shardlax import _trace_cache

    mesh = shardlax.make_mesh(fsdp=DEVICES)
    auto = shardlax.make_mesh(fsdp=DEVICES, axis_types="auto")

    Block = C.mlp_block(d)

    class Stack(nnx.Module):
        def __init__(self, rngs, wrap):
            self.blocks = nnx.List([wrap(Block(rngs)) for _ in range(layers)])

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    def loss(model, batch):
        return jnp.mean((model(batch[0]) - batch[1]) ** 2)

    def sharded(m):
        return Stack(nnx.Rngs(0), lambda b: shardlax.fully_shard(b, mesh=m))

    x = jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    ax = jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=NamedSharding(auto, P("fsdp")))

    def units(replay: bool):  # built untimed; the returned thunk is what is timed
        model = nnx.eval_shape(lambda: sharded(auto))

        def lower():
            saved = _trace_cache._trace_context
            if not replay:
                _trace_cache._trace_context = None
            try:
                return nnx.jit(nnx.grad(loss)).lower(model, (ax, ax))
            finally:
                _trace_cache._trace_context = saved

        return lower

    def trainer():
        model = nnx.eval_shape(lambda: sharded(mesh))
        tr = shardlax.Trainer(model, optax.adam(1e-3), loss, mesh=mesh, strategy="fsdp")
        state = tr.abstract_state()
        return lambda: tr.step.lower(state, (x, x))

    def gspmd():
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Stack(nnx.Rngs(0), lambda b: b)))
        state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype,
                sharding=NamedSharding(auto, P("fsdp", None) if a.ndim == 2 else P()),
            ),
            state,
        )  # fmt: skip

        def step(state, batch):
            return jax.grad(lambda s: loss(nnx.merge(graphdef, s), batch))(state)

        return lambda: jax.jit(step).lower(state, (ax, ax))

    return {  # name -> build(): the untimed setup, returning the lowering to time
        "shardlax": lambda: units(True),
        "shardlax, no replay": lambda: units(False),
        "trainer": trainer,
        "gspmd": gspmd,
    }


def run(depths, d: int, batch: int, repeats: int) -> list[dict]:
    import jax

    from shardlax import _trace_cache

    rows = []
    for layers in depths:
        C.phase(f"L={layers}: {repeats} cold lowerings + compiles per candidate")
        fns = candidates(layers, d, batch)
        names = list(fns)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
        for r in range(repeats):
            for name in C.rotated(names, r):
                jax.clear_caches()
                _trace_cache.clear()
                lower = fns[name]()  # the model and its abstract state, untimed
                t0 = time.perf_counter()
                lowered = lower()
                t1 = time.perf_counter()
                lowered.compile()
                times[name].append((t1 - t0, time.perf_counter() - t1))
        g_lower = statistics.median(t[0] for t in times["gspmd"])
        g_total = statistics.median(t[0] + t[1] for t in times["gspmd"])
        for name in names:
            lower = statistics.median(t[0] for t in times[name])
            total = statistics.median(t[0] + t[1] for t in times[name])
            rows.append(
                dict(layers=layers, d=d, batch=batch, devices=DEVICES, impl=name,
                     lower_s=lower, compile_s=statistics.median(t[1] for t in times[name]),
                     lower_ratio_vs_gspmd=lower / g_lower,
                     total_ratio_vs_gspmd=total / g_total, repeats=repeats)
            )  # fmt: skip
            print(f"  L={layers:3d} {name:20s} lower {lower * 1e3:7.0f} ms "
                  f"({lower / layers * 1e3:5.1f} ms/layer, {lower / g_lower:.2f}x GSPMD), "
                  f"lower+compile {total:.2f} s ({total / g_total:.2f}x)", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    r0 = rows[0]
    out = [
        "# Lowering an unrolled stack of `fully_shard` blocks",
        "",
        f"L blocks `x + W2 gelu(W1 x)` (d={r0['d']} -> {4 * r0['d']} -> {r0['d']}, f32), "
        f"fsdp={r0['devices']}, batch {r0['batch']}, one gradient step, cold (caches cleared "
        f"before each), medians of {r0['repeats']} rounds. Machine: {C.machine_line(info)}.",
        "",
    ]
    table = [
        [r["layers"], r["impl"], f"{r['lower_s'] * 1e3:.0f} ms",
         f"{r['lower_s'] / r['layers'] * 1e3:.1f} ms", f"{r['lower_ratio_vs_gspmd']:.2f}",
         f"{r['compile_s']:.2f} s", f"{r['total_ratio_vs_gspmd']:.2f}"]
        for r in rows
    ]  # fmt: skip
    header = ["layers", "candidate", "lower", "lower / layer", "lower / GSPMD", "compile",
              "lower+compile / GSPMD"]  # fmt: skip
    out.append(C.md_table(header, table))
    out += ["", "`trainer` is a whole Adam step (optimizer update included), the others a "
            "gradient: compare it with itself across depths."]  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    p.add_argument("--d", type=int, default=D)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--repeats", type=int, default=3)
    C.add_output_args(p)
    p.add_argument("--quick", action="store_true", help="L = 2, 4; 1 round")
    args = p.parse_args(argv)
    args.out = C.output_dir(args)
    if args.quick:
        args.depths, args.repeats = [2, 4], 1
    C.setup_devices(DEVICES)
    info = C.machine_info()
    t0 = time.perf_counter()
    rows = run(args.depths, args.d, args.batch, args.repeats)
    C.write_results(args.out, "tracing", rows, info, markdown)
    C.phase(f"wrote {args.out / 'tracing.jsonl'}, {args.out / 'tracing.md'} in "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
