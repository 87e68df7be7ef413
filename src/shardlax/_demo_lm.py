"""`python -m shardlax demo`: TinyLM trained sharded and on one device, side by side.

The sharded model and a single-device copy start from the same parameters
and see the same batches of a synthetic n-gram language whose entropy is
known. The demo prints both losses as they train, then the entropy floor,
the train step's collectives (declared vs compiled), per-device memory vs
one device, and writes a PNG of the two loss curves and a JSON summary.

How "equal" is decided. f32 addition is not associative, and a sharded step
adds the same numbers in another order (partial sums per device, then across
devices). The first steps must therefore agree within the f32 tolerance of
the test suite (`F32_RTOL`). Training then amplifies those last-bit
differences step after step, so no fixed bound holds for a long run. The
demo measures that amplification instead of guessing it: a third run, on one
device, sees every batch with its rows permuted, which is the same math with
another summation order. The sharded run may drift from the one-device run
at most `--drift-factor` times as far as the permuted run has drifted by the
same step. A real bug (a missing or doubled reduction) is off by far more
than f32 rounding at step 0 already.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, checkpoint
from shardlax._launch import FlagError, elapsed, phase
from shardlax.data import NGramLanguage
from shardlax.models import TinyLM, TinyLMConfig


def _say(*args, **kwargs) -> None:
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def _global_batch(mesh, batch_axes, array: np.ndarray) -> jax.Array:
    """A global array split over the batch axes; works across processes (each keeps its part)."""
    sharding = NamedSharding(mesh, P(batch_axes or None, None))
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


#: relative agreement of the first steps: the f32 row of the test suite's one tolerance
#: table (tests/utils.py TOLERANCES; tests/test_demo.py holds the two equal)
F32_RTOL = 2e-5


def _optimizer(model: TinyLM, mesh, lr: float, weight_decay: float) -> nnx.Optimizer:
    """AdamW on the model's parameters, its scalars (step counts) placed on `mesh`.

    optax creates the counts on the default device; the jitted step returns
    them replicated over the mesh, and a second input sharding would compile
    the step a second time. Placing them on the mesh first keeps it to one.
    """
    optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)
    state = nnx.state(optimizer)
    replicated = NamedSharding(mesh, P())

    def place(x):
        if isinstance(x.sharding, NamedSharding):
            return x
        value = np.asarray(x)  # built from the host value on every process: no transfer
        return jax.make_array_from_callback(value.shape, replicated, lambda idx: value[idx])

    state = jax.tree.map(place, state)
    nnx.update(optimizer, state)
    return optimizer


def _make_step():
    """An AdamW step on the model's own (sharded) parameters.

    Under FSDP + TP the layers already leave every gradient reduce-scattered
    or all-reduced to the layout of its parameter, so the optimizer update is
    elementwise on each device's shards: no collective of its own. One
    jitted function serves every model of the same structure and layout.
    """

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, inputs, targets):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets))(model)
        optimizer.update(model, grads)
        return loss

    return step


def _pure_step(graphdef):
    """The same AdamW step on `nnx.split((model, optimizer))` states, for one graph.

    Two models of one structure then share one compiled program (`nnx.jit`
    compiles again for each model object): the reference and the permuted
    one-device runs compile once between them.
    """

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, inputs, targets):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: m.loss(inputs, targets))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return step


def _compile(step, *args):
    """`step` compiled for `args` (the jit cache keeps it: the first call does not compile)."""
    compiled = step.lower(*args).compile()
    return getattr(compiled, "compiled", compiled)  # nnx.jit wraps jax.stages.Compiled


def versions() -> dict:
    """The versions a run used (written to demo.json)."""
    import flax
    import jaxlib

    import shardlax

    out = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "shardlax": shardlax.__version__,
    }
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "devices": f"{jax.device_count()} {jax.devices()[0].platform}",
        "processes": jax.process_count(),
    }


def flags(args: argparse.Namespace) -> dict:
    """The run's flags as given (the hidden --worker left out)."""
    out = {k: v for k, v in vars(args).items() if k not in ("worker", "command")}
    out["mesh"] = list(args.mesh)
    return out


def collective_rows(comparison) -> list[dict]:
    """The declared-vs-compiled table as JSON rows."""
    return [{**dataclasses.asdict(r), "axes": list(r.axes), "ok": r.ok} for r in comparison]


def agreement(losses_s, losses_1, losses_p, exact_steps: int, drift_factor: float) -> dict:
    """Are the sharded losses those of one device? See the module docstring.

    Steps `[0, exact_steps)`: relative difference <= F32_RTOL. Every later
    step t: relative difference <= max(F32_RTOL, drift_factor * the largest
    relative difference of the permuted one-device run up to step t).
    """
    ref = np.asarray(losses_1, np.float64)
    scale = np.maximum(np.abs(ref), 1e-30)
    rel_s = np.abs(np.asarray(losses_s, np.float64) - ref) / scale
    rel_p = np.abs(np.asarray(losses_p, np.float64) - ref) / scale
    k = min(exact_steps, len(rel_s))
    bound = np.maximum(F32_RTOL, drift_factor * np.maximum.accumulate(rel_p))
    bound[:k] = F32_RTOL
    finite = bool(np.all(np.isfinite(losses_s)) and np.all(np.isfinite(losses_1)))
    over = np.flatnonzero(~(rel_s <= bound))
    return {
        "ok": finite and over.size == 0,
        "finite": finite,
        "exact_steps": k,
        "f32_rtol": F32_RTOL,
        "drift_factor": drift_factor,
        "max_rel_exact": float(rel_s[:k].max()) if k else 0.0,
        "max_rel_sharded": float(rel_s.max()),
        "max_rel_permuted": float(rel_p.max()),
        "first_step_over": int(over[0]) if over.size else None,
        "rel_sharded": rel_s.tolist(),
        "rel_permuted": rel_p.tolist(),
        "bound": bound.tolist(),
    }


def describe(check: dict, steps: int) -> str:
    """The agreement check in words: what was compared with what."""
    k = check["exact_steps"]
    lines = [
        f"steps 0-{k - 1}: max relative difference sharded vs 1 device "
        f"{check['max_rel_exact']:.1e} (must be <= {check['f32_rtol']:g}, the f32 tolerance)"
        if k
        else "no step checked for exact agreement (--exact-steps 0)"
    ]
    if steps > k:
        lines.append(
            f"steps {k}-{steps - 1}: max {check['max_rel_sharded']:.1e}; rounding alone (1 device, "
            f"batch rows permuted) drifted {check['max_rel_permuted']:.1e}, and the sharded run "
            f"may drift {check['drift_factor']:g}x that by each step (at least {F32_RTOL:g})"
        )
    if not check["finite"]:
        lines.append("a loss is not finite")
    elif check["first_step_over"] is not None:
        t = check["first_step_over"]
        lines.append(
            f"first step over its bound: {t} ({check['rel_sharded'][t]:.1e} > "
            f"{check['bound'][t]:.1e})"
        )
    return "\n".join(lines)


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
        d_ff=args.d_ff or 4 * args.d_model,
        seq_len=args.seq_len,
        sequence_parallel=args.sequence_parallel,
        # pad the vocabulary so the model axis always splits it (Megatron's
        # make-vocab-size-divisible-by); padded logits never enter the loss
        vocab_multiple=math.lcm(8, model_axis * fsdp),
    )
    lead = jax.process_index() == 0
    _say(f"shardlax demo: TinyLM on mesh {dict(mesh.shape)} ({n_dev} {jax.devices()[0].platform} "
         f"devices, {jax.process_count()} process(es)) vs 1 device")  # fmt: skip
    _say(f"  {cfg}")
    _say(f"  data: random {args.order}-gram language, vocab {args.vocab}, {args.branching} "
         f"successors per context: loss floor {lang.loss_floor(args.seq_len):.4f} nats/token "
         f"(uniform guess {lang.uniform_loss:.4f})")  # fmt: skip

    phase("building TinyLM sharded and on one device (initialising parameters) ...")
    t = time.perf_counter()
    try:
        sharded = TinyLM(cfg, mesh=mesh, rngs=nnx.Rngs(args.seed))
    except (ValueError, TypeError) as e:  # a rule check_flags does not know yet
        raise FlagError(f"(flags as given) TinyLM rejects this configuration: {e}") from None
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    opt_s = _optimizer(sharded, mesh, args.lr, args.weight_decay)
    step_s = _make_step()
    start = 0
    if args.resume:  # any mesh's --save: restored into this mesh's layout
        for obj, part in ((sharded, "model"), (opt_s, "optimizer")):
            checkpoint.restore_model(os.path.join(args.resume, part), obj)
        start = int(np.asarray(opt_s.step[...].addressable_data(0)))
        phase(f"resumed from {args.resume} at step {start}")
    if lead:  # the single-device references live on process 0's first device
        one = shardlax.make_mesh(devices=[jax.local_devices()[0]])
        single = TinyLM(cfg, mesh=one, rngs=nnx.Rngs(args.seed))
        opt_1 = _optimizer(single, one, args.lr, args.weight_decay)
        if args.resume:  # the one-device references resume from the same checkpoint
            for obj, part in ((single, "model"), (opt_1, "optimizer")):
                checkpoint.restore_model(os.path.join(args.resume, part), obj)
        single_bytes = _bytes(nnx.state(single, nnx.Param))
        graphdef, state_1 = nnx.split((single, opt_1))
        # the permuted run starts from the same values, in the same layout (one compile)
        state_p = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state_1)
        del single, opt_1  # the states train; donation frees the modules' arrays
        step_1 = _pure_step(graphdef)  # one compiled program for both one-device runs
        order = np.random.default_rng(args.seed).permutation(args.batch)
        if args.batch > 1 and np.all(order == np.arange(args.batch)):
            order = order[::-1].copy()
    build_s = time.perf_counter() - t
    phase(
        f"built the models in {build_s:.1f} s: sharded over {n_dev} devices, and two one-device "
        f"copies (the reference, and one fed permuted batch rows to measure rounding drift)"
    )

    def batch(step: int):
        inputs, targets = lang.batch(args.batch, args.seq_len, step=step)
        return inputs, targets

    # compile once; the audit and the memory figures read that compiled program
    inputs, targets = batch(0)
    xs, ys = _global_batch(mesh, batch_axes, inputs), _global_batch(mesh, batch_axes, targets)
    phase("compiling the sharded train step (forward + backward + AdamW) ...")
    t = time.perf_counter()
    compiled_s = _compile(step_s, sharded, opt_s, xs, ys)
    compile_s = time.perf_counter() - t
    declared = sharded.declared_collectives((args.batch, args.seq_len), grad=True)
    report = audit.collectives(compiled_s, mesh=mesh)
    comparison = audit.compare(declared, report)
    mem_s = audit.memory(compiled_s)
    compile_1 = 0.0
    if lead:
        phase(f"compiled in {compile_s:.1f} s; compiling the one-device step ...")
        t = time.perf_counter()
        compiled_1 = _compile(step_1, state_1, jnp.asarray(inputs), jnp.asarray(targets))
        compile_1 = time.perf_counter() - t
        mem_1 = audit.memory(compiled_1)
        phase(f"compiled in {compile_1:.1f} s; training {args.steps} steps, three runs per step")

    losses_s, losses_1, losses_p = [], [], []
    t0 = time.perf_counter()
    _say(f"\n{'step':>6} {'sharded':>10} {'1 device':>10} {'rel diff':>9} {'permuted':>9} "
         f"{'time':>7}")  # fmt: skip
    for step in range(start, start + args.steps):
        inputs, targets = batch(step)
        xs, ys = _global_batch(mesh, batch_axes, inputs), _global_batch(mesh, batch_axes, targets)
        loss_s = float(step_s(sharded, opt_s, xs, ys))
        losses_s.append(loss_s)
        if lead:
            state_1, loss_1 = step_1(state_1, jnp.asarray(inputs), jnp.asarray(targets))
            state_p, loss_p = step_1(
                state_p, jnp.asarray(inputs[order]), jnp.asarray(targets[order])
            )
            loss_1, loss_p = float(loss_1), float(loss_p)
            losses_1.append(loss_1)
            losses_p.append(loss_p)
            if step % args.log_every == 0 or step == start + args.steps - 1:
                scale = max(abs(loss_1), 1e-30)
                _say(f"{step:>6} {loss_s:>10.5f} {loss_1:>10.5f} "
                     f"{abs(loss_s - loss_1) / scale:>9.1e} {abs(loss_p - loss_1) / scale:>9.1e} "
                     f"{time.perf_counter() - t0:>6.1f}s")  # fmt: skip
    run_s = time.perf_counter() - t0
    if args.save:  # every process writes its own shards
        for obj, part in ((sharded, "model"), (opt_s, "optimizer")):
            checkpoint.save_model(os.path.join(args.save, part), obj)
        checkpoint.wait()
        phase(f"saved the sharded model and optimizer to {args.save} (logical layout)")
    phase(f"trained {args.steps} steps in {run_s:.1f} s ({run_s / args.steps * 1e3:.0f} ms per "
          f"step for the three runs)")  # fmt: skip

    result = {"ok": True}
    if lead:
        floor = lang.loss_floor(args.seq_len)
        check = agreement(losses_s, losses_1, losses_p, args.exact_steps, args.drift_factor)
        equal = check["ok"]
        _say(f"\nloss after {args.steps} steps: sharded {losses_s[-1]:.5f}, one device "
             f"{losses_1[-1]:.5f}: {'equal' if equal else 'NOT equal'}")  # fmt: skip
        _say("  " + describe(check, args.steps).replace("\n", "\n  "))
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
             f"{single_bytes:,} on one device")  # fmt: skip
        plot = _plot(losses_s, losses_1, floor, lang.uniform_loss, dict(mesh.shape), check, args)
        timings = {
            "startup_s": round(elapsed() - build_s - compile_s - compile_1 - run_s, 3),
            "build_s": round(build_s, 3),
            "compile_sharded_s": round(compile_s, 3),
            "compile_single_s": round(compile_1, 3),
            "run_s": round(run_s, 3),
            "ms_per_step": round(run_s / args.steps * 1e3, 2),
        }
        summary = {
            "flags": flags(args),
            "seed": args.seed,
            "versions": versions(),
            "machine": machine(),
            "mesh": dict(mesh.shape),
            "processes": jax.process_count(),
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
            "losses_sharded": losses_s,
            "losses_single": losses_1,
            "losses_permuted": losses_p,
            "batch_permutation": order.tolist(),
            "max_rel_diff": check["max_rel_sharded"],
            "agreement": check,
            "equal": equal,
            "loss_floor": floor,
            "collectives": collective_rows(comparison),
            "collectives_ok": comparison.ok,
            "memory_sharded": mem_s.__dict__,
            "memory_single": mem_1.__dict__,
            "plot": plot,
            "timings": timings,
        }
        ok = equal and comparison.ok
        summary["ok"] = ok
        path = os.path.join(args.out, "demo.json")
        summary["timings"]["total_s"] = round(elapsed(), 3)
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
        _say(f"\nwrote {path}" + (f" and {plot}" if plot else ""))
        phase("done")
        _say("OK" if ok else "MISMATCH")
        result = {"ok": ok, **summary}
    return result


def _plot(losses_s, losses_1, floor, uniform, mesh_shape, check, args) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    ax_diff.semilogy(steps, np.maximum(check["rel_sharded"], 1e-9), ".", ms=3, color="k",
                     label="sharded vs 1 device")  # fmt: skip
    ax_diff.semilogy(steps, np.maximum(check["rel_permuted"], 1e-9), ".", ms=2,
                     color="tab:blue", alpha=0.6, label="1 device, rows permuted")  # fmt: skip
    ax_diff.semilogy(steps, check["bound"], color="tab:red", lw=1, label="bound")
    ax_diff.set_ylim(1e-9, 1e-1)
    ax_diff.set_ylabel("rel. diff")
    ax_diff.set_xlabel("step")
    ax_diff.legend(loc="upper left", fontsize=7, ncol=3)
    ax_diff.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(args.out, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path
