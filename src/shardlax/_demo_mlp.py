"""`python -m shardlax demo --model mlp`: a column -> row MLP, checked and audited."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import shardlax
from shardlax import audit


def run(args: argparse.Namespace) -> dict:
    """Build the MLP on a (data, fsdp, model) mesh, check it, print its collectives."""
    data, fsdp, model = args.mesh
    mesh = shardlax.make_mesh(data=data, fsdp=fsdp, model=model)
    d, f, batch = args.d_model, args.d_ff or 4 * args.d_model, args.batch
    print(f"mesh {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} devices, "
          f"{jax.process_count()} process(es)")  # fmt: skip
    print(f"MLP: ColumnParallelLinear({d}, {f}) -> gelu -> RowParallelLinear({f}, {d}), "
          f"batch {batch}")  # fmt: skip
    col = shardlax.nn.ColumnParallelLinear(d, f, mesh=mesh, rngs=nnx.Rngs(0))
    row = shardlax.nn.RowParallelLinear(f, d, mesh=mesh, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (batch, d))

    def forward(c, r, x):
        return r(jax.nn.gelu(c(x)))

    def loss(c, r, x):
        return jnp.mean(forward(c, r, x) ** 2)

    fwd = nnx.jit(forward)
    step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))
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
    print("\nmax |sharded - single device| / max |single device|:")
    for name, err in errors.items():
        print(f"  {name:16s} {err:.2e}")

    print("\nforward, declared vs compiled:")
    fwd_cmp = audit.compare(
        col.declared_collectives(x.shape) + row.declared_collectives((batch, f)),
        audit.collectives(fwd, col, row, x),
    )
    print(fwd_cmp.table())
    print("\nforward + backward (gradients of all parameters and of x), declared vs compiled:")
    declared = col.declared_collectives(x.shape, grad=True)
    declared += row.declared_collectives((batch, f), grad=True)
    if data * fsdp > 1:  # the loss is a mean over the batch, which is split over the data axes
        batch_axes = tuple(a for a, n in (("data", data), ("fsdp", fsdp)) if n > 1)
        declared.append(audit.Declared("all-reduce", batch_axes, "f32", bytes=4, why="loss"))
    step_cmp = audit.compare(declared, audit.collectives(step, col, row, x))
    print(step_cmp.table())
    ok = max(errors.values()) < 1e-5 and fwd_cmp.ok and step_cmp.ok
    print("\nOK: sharded == single device, compiled == declared" if ok else "\nMISMATCH")
    return {"errors": errors, "ok": ok}


def _np(x) -> np.ndarray:
    """The global value of `x` as numpy, also when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
    return np.asarray(x, np.float64)


def _rel(a, b) -> float:
    a, b = _np(a), _np(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
