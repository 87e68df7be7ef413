"""Scale-out by simulation: per-device memory and wire bytes of a cluster you do not have.

`study(config, strategy, mesh_shape, batch=...)` compiles one TinyLM train
step (shardlax `Trainer`, Adam) **abstractly** for a mesh of up to hundreds of
simulated devices: the model comes from `nnx.eval_shape`, the optimizer state
from `jax.eval_shape`, the batch is a `jax.ShapeDtypeStruct`, and
`.lower(...).compile().memory_analysis()` reports per-device bytes with
nothing allocated. Beside it, the same figures for the constrained GSPMD twin
(`shardlax._gspmd`: plain jnp, the same parameter layout, with
`with_sharding_constraint` on the residual stream) and, as the ideal, the
one-device program divided by N.

The process must have the devices: `main(argv)` (``python -m shardlax.plan``,
or ``python -m shardlax plan`` once registered) asks for them with
`jax.config.update('jax_num_cpu_devices', n)` before JAX starts, and re-runs
itself in a subprocess when JAX already started with fewer. The library
itself never sets device counts: `study` raises when there are too few.

Figures per program (bytes per device): `arguments` (parameters, optimizer
state, batch), `temp` (XLA's temporaries), collectives (tensors moved per
step, loops counted per trip) and `wire_bytes` (ring algorithms, see
`shardlax.declarations.wire_bytes`). Goals reported: arguments / ideal
(exactly 1/N of the state), temp / ideal (the one-device temp over N), wire
bytes / the constrained twin's.

Example:
    python -m shardlax.plan --preset 1b --mesh fsdp=64 --batch 64 --seq 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from shardlax._figures import Figures, figures_of

#: TinyLM configurations of the scale-out study (parameters ~1.1B and ~6.7B).
PRESETS = {
    "1b": dict(vocab=32000, d_model=2048, n_layers=20, n_heads=16, d_ff=5632),
    "7b": dict(vocab=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008),
    "tiny": dict(vocab=512, d_model=64, n_layers=2, n_heads=4, d_ff=128),
}
STRATEGIES = ("fsdp", "fsdp+tp")
MAX_DEVICES = 512


@dataclasses.dataclass(frozen=True)
class Study:
    """What one abstract compile found; `table()` prints it."""

    config: dict
    strategy: str
    mesh: dict[str, int]
    batch: int
    seq: int
    params: int  # parameters of the model
    shardlax: Figures
    gspmd: Figures | None
    single: Figures | None  # the one-device program (for the ideal temp)
    ideal_arguments: float  # (parameters + Adam state + batch) / N, scalars once

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def ideal_temp(self) -> float | None:
        return None if self.single is None else self.single.temp / self.devices

    def goals(self) -> dict[str, float | None]:
        """arguments / ideal, temp / ideal, wire bytes / the constrained GSPMD twin's."""
        s = self.shardlax
        return {
            "arguments_vs_ideal": s.arguments / self.ideal_arguments,
            "temp_vs_ideal": None if self.ideal_temp is None else s.temp / self.ideal_temp,
            "wire_vs_gspmd": None
            if self.gspmd is None or not self.gspmd.wire_bytes
            else s.wire_bytes / self.gspmd.wire_bytes,
            "temp_vs_gspmd": None
            if self.gspmd is None or not self.gspmd.temp
            else s.temp / self.gspmd.temp,
        }

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("shardlax", "gspmd", "single"):
            f = getattr(self, name)
            out[name] = None if f is None else f.to_dict()
        out["devices"] = self.devices
        out["ideal_temp"] = self.ideal_temp
        out["goals"] = self.goals()
        out["gspmd_baseline"] = "constrained twin (with_sharding_constraint on the residual stream)"
        return out

    def table(self) -> str:
        """A markdown table: shardlax, the constrained GSPMD twin and the ideal, per device."""

        def gib(x):
            if x is None:
                return "-"
            for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
                if x >= scale:
                    return f"{x / scale:.2f} {unit}"
            return f"{x:.0f} B"

        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [
            f"TinyLM {self.params / 1e9:.3g}B params, strategy {self.strategy}, mesh {mesh} "
            f"({self.devices} devices), batch {self.batch} x {self.seq} tokens, Adam; "
            f"GSPMD = constrained twin (with_sharding_constraint on the residual stream)",
            "",
            "| program | arguments | temp | collectives/step | wire bytes/step | compile |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, f in (("shardlax", self.shardlax), ("GSPMD (constrained)", self.gspmd)):
            if f is not None:
                rows.append(
                    f"| {name} | {gib(f.arguments)} | {gib(f.temp)} | {f.collectives} | "
                    f"{gib(f.wire_bytes)} | {f.compile_s:.1f} s |"
                )
        rows.append(
            f"| ideal (1/N) | {gib(self.ideal_arguments)} | {gib(self.ideal_temp)} | - | - | - |"
        )
        g = self.goals()

        def r(x):
            return "-" if x is None else f"{x:.3f}"

        rows += [
            "",
            f"arguments / ideal {r(g['arguments_vs_ideal'])}, temp / ideal "
            f"{r(g['temp_vs_ideal'])}, wire bytes / GSPMD {r(g['wire_vs_gspmd'])}, "
            f"temp / GSPMD {r(g['temp_vs_gspmd'])}",
        ]
        return "\n".join(rows)


def _figures(compiled, t: float, mesh=None) -> Figures:
    return figures_of(compiled, mesh=mesh, compile_s=t)


def _check(config, strategy: str, mesh_shape: dict[str, int], batch: int) -> None:
    import jax

    if strategy not in STRATEGIES:
        raise ValueError(
            f"plan.study(strategy={strategy!r}): expected one of {STRATEGIES}. Use 'fsdp' "
            f"on a (data, fsdp) mesh or 'fsdp+tp' on a (data, fsdp, model) mesh."
        )
    bad = set(mesh_shape) - {"data", "fsdp", "model"}
    if bad:
        raise ValueError(
            f"plan.study(mesh_shape={mesh_shape!r}): unknown axes {sorted(bad)}; the axes are "
            f"'data', 'fsdp' and 'model', e.g. {{'fsdp': 64}}."
        )
    n = math.prod(mesh_shape.values())
    if n > MAX_DEVICES:
        raise ValueError(
            f"plan.study(mesh_shape={mesh_shape!r}): {n} devices, more than the {MAX_DEVICES} "
            f"this study simulates. Use a mesh of at most {MAX_DEVICES} devices."
        )
    have = jax.device_count()
    if have < n:
        raise ValueError(
            f"plan.study(mesh_shape={mesh_shape!r}) needs {n} devices, this process has "
            f"{have}. Run `python -m shardlax.plan` (it asks for simulated devices), or call "
            f"jax.config.update('jax_num_cpu_devices', {n}) right after `import jax`."
        )
    if mesh_shape.get("model", 1) > 1 and strategy == "fsdp":
        raise ValueError(
            f"plan.study(strategy='fsdp', mesh_shape={mesh_shape!r}): a 'model' axis of size "
            f"{mesh_shape['model']} needs strategy='fsdp+tp'. Pass strategy='fsdp+tp', or "
            f"drop the 'model' axis."
        )
    split = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if batch % split:
        raise ValueError(
            f"plan.study(batch={batch}): the batch is split over data x fsdp (size {split}): "
            f"{split} does not divide {batch}. Use a batch divisible by {split}."
        )
    del config


def study(
    config: Any,
    strategy: str,
    mesh_shape: dict[str, int],
    *,
    batch: int,
    seq: int | None = None,
    learning_rate: float = 1e-4,
    gspmd: bool = True,
    single: bool = True,
) -> Study:
    """Compile a TinyLM Adam train step abstractly and return its per-device figures.

    Args:
      config: a `shardlax.models.TinyLMConfig`.
      strategy: ``'fsdp'`` or ``'fsdp+tp'`` (`shardlax.Trainer` strategies).
      mesh_shape: axis sizes, e.g. ``{'fsdp': 64}`` or ``{'fsdp': 32, 'model': 8}``;
        this process must have that many devices (see the module docstring).
      batch: global batch (sequences); split over data x fsdp.
      seq: tokens per sequence (default ``config.seq_len``).
      learning_rate: Adam's (it does not change the figures).
      gspmd: also compile the constrained GSPMD twin.
      single: also compile the one-device program (the ideal temp is its temp / N).

    Returns:
      A `Study` (`.table()` prints it, `.to_dict()` for JSON, `.goals()`).

    Nothing is allocated: parameters, optimizer state and batch are abstract.
    """
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import shardlax
    from shardlax import _gspmd
    from shardlax.models import TinyLM

    mesh_shape = {k: int(v) for k, v in mesh_shape.items()}
    _check(config, strategy, mesh_shape, batch)
    seq = seq or config.seq_len
    n = math.prod(mesh_shape.values())
    devices = jax.devices()[:n]
    mesh = shardlax.make_mesh(**mesh_shape, devices=devices)
    tx = optax.adam(learning_rate)

    model = nnx.eval_shape(lambda: TinyLM(config, mesh=mesh, rngs=nnx.Rngs(0)))
    trainer = shardlax.Trainer(model, tx, lambda m, b: m.loss(*b), mesh=mesh, strategy=strategy)
    state = trainer.abstract_state()
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    tok = jax.ShapeDtypeStruct((batch, seq), jax.numpy.int32,
                               sharding=NamedSharding(mesh, P(batch_axes)))  # fmt: skip
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, (tok, tok)).compile()
    ours = _figures(compiled, time.perf_counter() - t0, mesh)

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    state_leaves = jax.tree.leaves((state.params, state.opt_state))
    big = sum(x.size * x.dtype.itemsize for x in state_leaves if x.size > 1)
    small = sum(x.size * x.dtype.itemsize for x in state_leaves if x.size <= 1)
    ideal_args = (big + 2 * batch * seq * 4) / n + small + 4  # + the step counter

    twin = one = None
    if gspmd:
        auto = shardlax.make_mesh(**mesh_shape, devices=devices, axis_types="auto")
        fn, args = _gspmd.abstract_tinylm_step(
            config, params, auto, P(batch_axes), P(batch_axes, None, None), tx, batch, seq
        )
        t0 = time.perf_counter()
        twin = _figures(fn.lower(*args).compile(), time.perf_counter() - t0, auto)
    if single:
        fn, args = _gspmd.abstract_tinylm_step(config, params, None, P(), None, tx, batch, seq)
        t0 = time.perf_counter()
        one = _figures(fn.lower(*args).compile(), time.perf_counter() - t0)
    return Study(
        config=dataclasses.asdict(config),
        strategy=strategy,
        mesh=mesh_shape,
        batch=batch,
        seq=seq,
        params=n_params,
        shardlax=ours,
        gspmd=twin,
        single=one,
        ideal_arguments=ideal_args,
    )


# ------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shardlax.plan",
        description="Per-device memory and wire bytes of a TinyLM train step on a simulated "
        "mesh (abstract compile, nothing allocated), beside the constrained GSPMD twin.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    for name in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"override the preset's {name}")  # fmt: skip
    p.add_argument("--remat", action="store_true", help="TinyLMConfig(remat=True)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp")
    p.add_argument("--mesh", nargs="+", default=["fsdp=64"], metavar="AXIS=SIZE",
                   help="e.g. fsdp=64, or fsdp=32 model=8")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="global batch (default: devices)")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--no-gspmd", action="store_true", help="skip the GSPMD twin")
    p.add_argument("--no-single", action="store_true", help="skip the one-device program")
    p.add_argument("--json", default=None, help="also write the study as JSON here")
    return p


def _mesh_arg(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for item in items:
        axis, _, size = item.partition("=")
        if not size.isdigit():
            raise SystemExit(f"--mesh {item!r}: expected AXIS=SIZE, e.g. fsdp=64.")
        out[axis] = int(size)
    return out


def _request_devices(n: int) -> bool:
    """Ask for `n` simulated CPU devices; False when JAX already started with fewer."""
    import jax

    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return jax.device_count() >= n
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (`python -m shardlax.plan --help`); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    mesh_shape = _mesh_arg(args.mesh)
    n = math.prod(mesh_shape.values())
    if n > MAX_DEVICES:
        print(f"--mesh: {n} devices, more than {MAX_DEVICES}.", file=sys.stderr)
        return 2
    if not _request_devices(n):
        # JAX already runs with fewer devices: study in a fresh process that asks for them.
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        return subprocess.run([sys.executable, "-m", "shardlax.plan", *argv], env=env).returncode
    from shardlax.models import TinyLMConfig

    fields = dict(PRESETS[args.preset])
    for name in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    config = TinyLMConfig(**fields, seq_len=args.seq, remat=args.remat)
    try:
        result = study(
            config, args.strategy, mesh_shape, batch=args.batch or n, seq=args.seq,
            gspmd=not args.no_gspmd, single=not args.no_single,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
