"""`python -m shardlax demo --model mlp`: a column -> row MLP, checked and audited."""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shardlax
from shardlax import audit
from shardlax._demo_lm import collective_rows, flags, machine, versions
from shardlax._launch import elapsed, phase

#: max relative error of each value against the one-device reference (the f32 tolerance)
F32_RTOL = 2e-5


def run(args: argparse.Namespace) -> dict:
    """Build the MLP on a (data, fsdp, model) mesh, check it, print its collectives."""
    data, fsdp, model = args.mesh
    mesh = shardlax.make_mesh(data=data, fsdp=fsdp, model=model)
    d, f, batch = args.d_model, args.d_ff or 4 * args.d_model, args.batch
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    say(f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")  # fmt: skip
    say(f"MLP: ColumnParallelLinear({d}, {f}) -> gelu -> RowParallelLinear({f}, {d}), "
        f"batch {batch}")  # fmt: skip
    t = time.perf_counter()
    col = shardlax.nn.ColumnParallelLinear(d, f, mesh=mesh, rngs=nnx.Rngs(args.seed))
    row = shardlax.nn.RowParallelLinear(f, d, mesh=mesh, rngs=nnx.Rngs(args.seed + 1))
    x = jax.random.normal(jax.random.key(args.seed + 2), (batch, d))

    def forward(c, r, x):
        return r(jax.nn.gelu(c(x)))

    def loss(c, r, x):
        return jnp.mean(forward(c, r, x) ** 2)

    fwd = nnx.jit(forward)
    step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))
    build_s = time.perf_counter() - t
    phase(f"built the layers in {build_s:.1f} s; compiling forward and forward + backward ...")
    t = time.perf_counter()
    compiled_fwd = fwd.lower(col, row, x).compile()
    compiled_step = step.lower(col, row, x).compile()
    compile_s = time.perf_counter() - t
    phase(f"compiled in {compile_s:.1f} s; running and checking against one device ...")
    t = time.perf_counter()
    y = fwd(col, row, x)
    value, (g_col, g_row, g_x) = step(col, row, x)

    # single-device math on the full arrays, in numpy's float64
    w1, b1 = _np(col.kernel[...]), _np(col.bias[...])
    w2, b2 = _np(row.kernel[...]), _np(row.bias[...])
    xs = _np(x)
    ref_fn = jax.jit(
        lambda x, w1, b1, w2, b2: jnp.mean((jax.nn.gelu(x @ w1 + b1[None]) @ w2 + b2[None]) ** 2)
    )  # the same math written plainly, in float32 on one device
    args32 = [jnp.asarray(a, jnp.float32) for a in (xs, w1, b1, w2, b2)]
    ref_value, ref_grads = jax.value_and_grad(ref_fn, argnums=(0, 1, 2, 3, 4))(*args32)
    ref_y = jax.nn.gelu(args32[0] @ args32[1] + args32[2][None]) @ args32[3] + args32[4][None]
    errors = {
        "forward": _rel(y, ref_y),
        "loss": _rel(value, ref_value),
        "d input": _rel(g_x, ref_grads[0]),
        "d column kernel": _rel(g_col["kernel"][...], ref_grads[1]),
        "d column bias": _rel(g_col["bias"][...], ref_grads[2]),
        "d row kernel": _rel(g_row["kernel"][...], ref_grads[3]),
        "d row bias": _rel(g_row["bias"][...], ref_grads[4]),
    }
    run_s = time.perf_counter() - t
    say("\nmax |sharded - single device| / max |single device|:")
    for name, err in errors.items():
        say(f"  {name:16s} {err:.2e}")

    say("\nforward, declared vs compiled:")
    fwd_cmp = audit.compare(
        col.declared_collectives(x.shape) + row.declared_collectives((batch, f)),
        audit.collectives(getattr(compiled_fwd, "compiled", compiled_fwd), mesh=mesh),
    )
    say(fwd_cmp.table())
    say("\nforward + backward (gradients of all parameters and of x), declared vs compiled:")
    declared = col.declared_collectives(x.shape, grad=True)
    declared += row.declared_collectives((batch, f), grad=True)
    if data * fsdp > 1:  # the loss is a mean over the batch, which is split over the data axes
        batch_axes = tuple(a for a, n in (("data", data), ("fsdp", fsdp)) if n > 1)
        declared.append(audit.Declared("all-reduce", batch_axes, "f32", bytes=4, why="loss"))
    compiled = getattr(compiled_step, "compiled", compiled_step)
    step_cmp = audit.compare(declared, audit.collectives(compiled, mesh=mesh))
    say(step_cmp.table())
    ok = max(errors.values()) < F32_RTOL and fwd_cmp.ok and step_cmp.ok
    summary = {
        "model": "mlp",
        "flags": flags(args),
        "seed": args.seed,
        "versions": versions(),
        "machine": machine(),
        "mesh": dict(mesh.shape),
        "errors": errors,
        "f32_rtol": F32_RTOL,
        "collectives_forward": collective_rows(fwd_cmp),
        "collectives": collective_rows(step_cmp),
        "collectives_ok": fwd_cmp.ok and step_cmp.ok,
        "timings": {
            "build_s": round(build_s, 3),
            "compile_s": round(compile_s, 3),
            "run_s": round(run_s, 3),
            "total_s": round(elapsed(), 3),
        },
        "ok": ok,
    }
    if jax.process_index() == 0:
        path = os.path.join(args.out, "demo.json")
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=1)
        say(f"\nwrote {path}")
    say("\nOK: sharded == single device, compiled == declared" if ok else "\nMISMATCH")
    return summary


def _np(x) -> np.ndarray:
    """The global value of `x` as numpy, also when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
    return np.asarray(x, np.float64)


def _rel(a, b) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
