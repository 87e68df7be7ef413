"""Memory-budget planner: fewest wire bytes per step for a deep FSDP stack within a budget.

A stack of `LAYERS` `fully_shard` blocks (`x + W2 gelu(W1 x)`, d -> 4d -> d)
on an fsdp axis of `DEVICES` devices, one Adam step through
`shardlax.Trainer`, small batch (where keeping gathered parameters pays:
issue 13's "Small batches"). For budgets spread between the lowest peak the
planner finds and the peak of keeping every unit, `shardlax.budget.plan`
chooses per unit reshard_after_forward / remat from abstract compiles
(nothing allocated); the chosen configuration is then built and compiled
again here and read with `shardlax.audit.memory` / `audit.collectives`, so
each row says whether the compiled program confirms the prediction.

Per row: budget, units keeping their parameters, units rematerialised, peak
(arguments + outputs + temp - donated) and wire bytes per device and step,
beside FSDP2's default (every unit reshards) and keeping every unit.

Run:
    python benchmarks/budget.py                 # 48 layers, d=256, batch 64, 8 devices
    python benchmarks/budget.py --quick         # 4 layers, d=32 (seconds)
    python benchmarks/budget.py --publish       # write benchmarks/results/
"""

from __future__ import annotations

import argparse
import time

import _common as C

# ----------------------------------------------------------------------------- config
DEVICES = 8
LAYERS = 48
D = 256
BATCH = 64
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # budgets between the lowest peak and keep-all's
# -----------------------------------------------------------------------------


def run(layers: int, d: int, batch: int, fractions) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardlax
    from shardlax import audit

    mesh = shardlax.make_mesh(fsdp=DEVICES)

    Block = C.mlp_block(d)

    class Stack(nnx.Module):
        def __init__(self, choices, rngs):
            self.blocks = nnx.List(
                [shardlax.fully_shard(Block(rngs), mesh=mesh,
                                      reshard_after_forward=choices[i].reshard_after_forward)
                 for i in range(layers)]
            )  # fmt: skip
            self.remat = tuple(choices[i].remat for i in range(layers))

        def __call__(self, x):
            for block, remat in zip(self.blocks, self.remat, strict=True):
                x = nnx.remat(lambda m, h: m(h))(block, x) if remat else block(x)
            return x

    def loss(m, b):
        return jnp.mean((m(b[0]) - b[1]) ** 2)

    def build(choices):
        model = nnx.eval_shape(lambda: Stack(choices, nnx.Rngs(0)))
        return shardlax.Trainer(model, optax.adam(1e-3), loss, mesh=mesh, strategy="fsdp")

    x = jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    cache: dict = {}
    C.phase(f"extremes: {layers} units, d={d}, batch {batch}, fsdp={DEVICES}")
    loose = shardlax.budget.plan(build, 2**40, units=layers, batch=(x, x), cache=cache)
    ext = loose.extremes
    low = min(f.peak for f in cache.values())
    high = ext["no_reshard"].peak
    rows = []
    for frac in fractions:
        budget = int(low + frac * (high - low))
        C.phase(f"plan for budget {C.fmt_bytes(budget)} ({frac:.2f} of the way to keep-all)")
        t0 = time.perf_counter()
        before = len(cache)
        p = shardlax.budget.plan(build, budget, units=layers, batch=(x, x), cache=cache)
        plan_s = time.perf_counter() - t0
        # confirm: build the chosen configuration again and read its compiled program
        trainer = build(p.choices)
        compiled = trainer.step.lower(trainer.abstract_state(), (x, x)).compile()
        mem = audit.memory(compiled)
        wire = audit.collectives(compiled, mesh=mesh).executed_wire_bytes()
        confirmed = mem.peak_estimate == p.predicted.peak and wire == p.predicted.wire_bytes
        rows.append(
            dict(
                layers=layers, d=d, batch=batch, devices=DEVICES, fraction=frac, budget=budget,
                kept=len(p.kept), remat=len(p.rematerialised), peak=p.predicted.peak,
                temp=p.predicted.temp, arguments=p.predicted.arguments,
                wire_bytes=p.predicted.wire_bytes, all_gathers=p.predicted.all_gathers,
                compiled_peak=mem.peak_estimate, compiled_wire_bytes=wire, confirmed=confirmed,
                new_compiles=len(cache) - before, plan_s=plan_s,
                reshard_peak=ext["reshard"].peak, reshard_wire=ext["reshard"].wire_bytes,
                keep_peak=high, keep_wire=ext["no_reshard"].wire_bytes,
                remat_peak=ext["reshard+remat"].peak, remat_wire=ext["reshard+remat"].wire_bytes,
                lowest_peak=low,
            )
        )  # fmt: skip
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    r0 = rows[0]
    out = [
        "# Memory-budget planner (`shardlax.budget.plan`)",
        "",
        f"{r0['layers']} `fully_shard` blocks (d={r0['d']} -> {4 * r0['d']} -> {r0['d']}, f32), "
        f"fsdp={r0['devices']}, batch {r0['batch']}, one Adam step via `shardlax.Trainer`, "
        f"compiled abstractly. Machine: {C.machine_line(info)}.",
        "",
        f"Extremes per device: every unit reshards (FSDP2's default) peak "
        f"{C.fmt_bytes(r0['reshard_peak'])}, wire {C.fmt_bytes(r0['reshard_wire'])}; reshard + "
        f"remat peak {C.fmt_bytes(r0['remat_peak'])}, wire {C.fmt_bytes(r0['remat_wire'])}; "
        f"every unit keeps its parameters peak {C.fmt_bytes(r0['keep_peak'])}, wire "
        f"{C.fmt_bytes(r0['keep_wire'])}; lowest peak found {C.fmt_bytes(r0['lowest_peak'])}.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [C.fmt_bytes(r["budget"]), f"{r['kept']}/{r['layers']}", r["remat"],
             C.fmt_bytes(r["peak"]), C.fmt_bytes(r["wire_bytes"]),
             f"{r['wire_bytes'] / r['reshard_wire']:.3f}", r["all_gathers"],
             "yes" if r["confirmed"] else "NO", r["new_compiles"], f"{r['plan_s']:.1f} s"]
        )  # fmt: skip
    header = ["budget/device", "units keeping", "units remat", "peak (plan)",
              "wire/step (plan)", "wire / all-reshard", "all-gathers",
              "compiled == predicted", "new compiles", "plan time"]  # fmt: skip
    out.append(C.md_table(header, table))
    out += ["", "Compiles are cached across the budgets of one run (`plan(cache=...)`)."]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=LAYERS)
    p.add_argument("--d", type=int, default=D)
    p.add_argument("--batch", type=int, default=BATCH)
    C.add_output_args(p)
    p.add_argument("--quick", action="store_true", help="4 layers, d=32, 3 budgets")
    args = p.parse_args(argv)
    args.out = C.output_dir(args)
    fractions = FRACTIONS
    if args.quick:
        args.layers, args.d, args.batch, fractions = 4, 32, 16, (0.0, 0.5, 1.0)
    C.setup_devices(DEVICES)
    info = C.machine_info()
    t0 = time.perf_counter()
    rows = run(args.layers, args.d, args.batch, fractions)
    C.write_results(args.out, "budget", rows, info, markdown)
    C.phase(f"wrote {args.out / 'budget.jsonl'}, {args.out / 'budget.md'} in "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
