"""`python -m shardlax demo`: TinyLM trained sharded and on one device, side by side.

The sharded model and a single-device copy start from the same parameters
and see the same batches of a synthetic n-gram language whose entropy is
known. The demo prints both losses as they train, then the entropy floor,
the train step's collectives (declared vs compiled), per-device memory vs
one device, and writes a PNG of the two loss curves and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit
from shardlax.data import NGramLanguage
from shardlax.models import TinyLM, TinyLMConfig


def _say(*args, **kwargs) -> None:
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def _global_batch(mesh, batch_axes, array: np.ndarray) -> jax.Array:
    """A global array split over the batch axes; works across processes (each keeps its part)."""
    sharding = NamedSharding(mesh, P(batch_axes or None, None))
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _make_step(model: TinyLM, lr: float, weight_decay: float):
    """An AdamW step on the model's own (sharded) parameters.

    Under FSDP + TP the layers already leave every gradient reduce-scattered
    or all-reduced to the layout of its parameter, so the optimizer update is
    elementwise on each device's shards: no collective of its own.
    """
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets))(model)
        optimizer.update(model, grads)
        return loss

    return optimizer, step


def _bytes(tree) -> int:
    """Per-device bytes of the first device's shards of every array in `tree`."""
    dev = None
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        shards = leaf.addressable_shards
        dev = dev or shards[0].device
        total += sum(s.data.nbytes for s in shards if s.device == dev)
    return total


def run(args: argparse.Namespace) -> dict:
    data, fsdp, model_axis = args.mesh
    n_dev = data * fsdp * model_axis
    mesh = shardlax.make_mesh(data=data, fsdp=fsdp, model=model_axis)
    lang = NGramLanguage(vocab=args.vocab, order=args.order, branching=args.branching, seed=0)
    cfg = TinyLMConfig(
        vocab=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads or args.heads,
        d_ff=4 * args.d_model,
        seq_len=args.seq_len,
        sequence_parallel=args.sequence_parallel,
    )
    _say(f"shardlax demo: TinyLM on mesh {dict(mesh.shape)} ({n_dev} {jax.devices()[0].platform} "
         f"devices, {jax.process_count()} process(es)) vs 1 device")  # fmt: skip
    _say(f"  {cfg}")
    _say(f"  data: random {args.order}-gram language, vocab {args.vocab}, {args.branching} "
         f"successors per context: loss floor {lang.loss_floor(args.seq_len):.4f} nats/token "
         f"(uniform guess {lang.uniform_loss:.4f})")  # fmt: skip

    sharded = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(args.seed))
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    opt_s, step_s = _make_step(sharded, args.lr, args.weight_decay)
    lead = jax.process_index() == 0
    if lead:  # the single-device reference lives on process 0's first device
        one = shardlax.make_mesh(devices=[jax.local_devices()[0]])
        single = TinyLM(cfg, mesh=one, rngs=nnx.Rngs(args.seed))
        opt_1, step_1 = _make_step(single, args.lr, args.weight_decay)

    def batch(step: int):
        inputs, targets = lang.batch(args.batch, args.seq_len, step=step)
        return inputs, targets

    # audit and memory of the sharded step, before training donates anything
    inputs, targets = batch(0)
    xs, ys = _global_batch(mesh, batch_axes, inputs), _global_batch(mesh, batch_axes, targets)
    declared = sharded.declared_collectives((args.batch, args.seq_len), grad=True)
    report = audit.collectives(step_s, sharded, opt_s, xs, ys, mesh=mesh)
    comparison = audit.compare(declared, report)
    mem_s = audit.memory(step_s, sharded, opt_s, xs, ys)
    if lead:
        mem_1 = audit.memory(step_1, single, opt_1, jnp.asarray(inputs), jnp.asarray(targets))

    losses_s, losses_1 = [], []
    t0 = time.perf_counter()
    _say(f"\n{'step':>6} {'sharded':>10} {'1 device':>10} {'|diff|':>9} {'time':>7}")
    for step in range(args.steps):
        inputs, targets = batch(step)
        xs, ys = _global_batch(mesh, batch_axes, inputs), _global_batch(mesh, batch_axes, targets)
        loss_s = float(step_s(sharded, opt_s, xs, ys))
        losses_s.append(loss_s)
        if lead:
            loss_1 = float(step_1(single, opt_1, jnp.asarray(inputs), jnp.asarray(targets)))
            losses_1.append(loss_1)
            if step % args.log_every == 0 or step == args.steps - 1:
                _say(f"{step:>6} {loss_s:>10.5f} {loss_1:>10.5f} {abs(loss_s - loss_1):>9.2e} "
                     f"{time.perf_counter() - t0:>6.1f}s")  # fmt: skip

    result = {"ok": True}
    if lead:
        floor = lang.loss_floor(args.seq_len)
        diffs = np.abs(np.array(losses_s) - np.array(losses_1))
        rel = float(np.max(diffs / np.maximum(np.abs(losses_1), 1e-30)))
        equal = rel < args.rtol
        _say(f"\nloss after {args.steps} steps: sharded {losses_s[-1]:.5f}, one device "
             f"{losses_1[-1]:.5f} (max relative difference over all steps {rel:.1e}: "
             f"{'equal' if equal else 'NOT equal'} within {args.rtol:g})")  # fmt: skip
        tail = max(1, len(losses_1) // 10)
        recent = float(np.mean(losses_1[-tail:]))
        _say(f"entropy floor {floor:.5f} nats/token (uniform guess {lang.uniform_loss:.3f}); "
             f"start {losses_1[0]:.3f}, mean of the last {tail} steps {recent:.3f}: "
             f"{recent - floor:.3f} above the floor")  # fmt: skip
        _say("\ncollectives of one train step (forward + backward + AdamW), declared vs compiled:")
        _say(comparison.table())
        loops = sorted({c.trips for c in report if c.in_loop})
        _say(f"(the blocks run in a lax.scan: their collectives stand once in the program and run "
             f"{', '.join(map(str, loops)) or 'no'} times per step; bytes sent per device per "
             f"step: {report.executed_wire_bytes():,.0f})")  # fmt: skip
        _say("\nper-device memory of the train step (bytes, from the compiled program):")
        _say("| | arguments (params + optimizer + batch) | temp | total |")
        _say("|---|---:|---:|---:|")
        for name, m in (("1 device", mem_1), (f"sharded, {n_dev} devices", mem_s)):
            _say(f"| {name} | {m.arguments:,} | {m.temp:,} | {m.arguments + m.temp:,} |")
        _say(f"per-device parameters: {_bytes(nnx.state(sharded, nnx.Param)):,} bytes sharded vs "
             f"{_bytes(nnx.state(single, nnx.Param)):,} on one device")  # fmt: skip
        os.makedirs(args.out, exist_ok=True)
        plot = _plot(losses_s, losses_1, floor, lang.uniform_loss, dict(mesh.shape), args)
        summary = {
            "mesh": dict(mesh.shape),
            "processes": jax.process_count(),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "losses_sharded": losses_s,
            "losses_single": losses_1,
            "max_rel_diff": rel,
            "equal": equal,
            "loss_floor": floor,
            "collectives_ok": comparison.ok,
            "memory_sharded": mem_s.__dict__,
            "memory_single": mem_1.__dict__,
            "plot": plot,
        }
        with open(os.path.join(args.out, "demo.json"), "w") as f:
            json.dump(summary, f, indent=1)
        _say(f"\nwrote {os.path.join(args.out, 'demo.json')}" + (f" and {plot}" if plot else ""))
        ok = equal and comparison.ok and all(math.isfinite(v) for v in losses_s)
        _say("OK" if ok else "MISMATCH")
        result = {"ok": ok, **summary}
    return result


def _plot(losses_s, losses_1, floor, uniform, mesh_shape, args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("(matplotlib not installed: no plot; pip install -e '.[plot]')")
        return None
    fig, (ax, ax_diff) = plt.subplots(
        2, 1, figsize=(7, 5.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    steps = np.arange(len(losses_1))
    ax.plot(steps, losses_1, lw=3, alpha=0.5, label="1 device")
    ax.plot(steps, losses_s, lw=1.2, ls="--", color="k",
            label=f"sharded, mesh {tuple(mesh_shape.values())} (data, fsdp, model)")  # fmt: skip
    ax.axhline(floor, color="tab:red", lw=1, label=f"entropy floor {floor:.3f}")
    ax.axhline(uniform, color="gray", lw=1, ls=":", label=f"uniform guess {uniform:.3f}")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("TinyLM: sharded training equals single-device training")
    ax.legend()
    ax.grid(alpha=0.3)
    rel = np.abs(np.array(losses_s) - np.array(losses_1)) / np.abs(np.array(losses_1))
    ax_diff.semilogy(steps, np.maximum(rel, 1e-9), ".", ms=3, color="k")
    ax_diff.axhline(args.rtol, color="tab:red", lw=1, label=f"tolerance {args.rtol:g}")
    ax_diff.axhline(np.finfo(np.float32).eps, color="gray", lw=1, ls=":", label="f32 epsilon")
    ax_diff.set_ylim(1e-9, 1e-2)
    ax_diff.set_ylabel("|rel. diff|")
    ax_diff.set_xlabel("step")
    ax_diff.legend(loc="upper left", fontsize=8)
    ax_diff.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.out, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path
