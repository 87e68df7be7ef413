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
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import shardlax
from shardlax import audit, checkpoint
from shardlax._demo_lm_agreement import F32_RTOL as F32_RTOL
from shardlax._demo_lm_agreement import agreement, describe
from shardlax._demo_lm_report import _bytes, _plot, collective_rows, flags, machine, versions
from shardlax._demo_lm_steps import _compile, _make_step, _optimizer, _pure_step
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
