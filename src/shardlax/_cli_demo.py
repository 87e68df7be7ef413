"""The `demo` subcommand: start the processes or the simulated devices, then run the demo.

`_demo` runs `python -m shardlax demo` once its flags are checked: it spawns
`--processes` workers (or joins as one), asks for the simulated CPU devices,
and hands over to `shardlax._demo_lm` or `shardlax._demo_mlp`.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from shardlax._cli_flags import _fail, _parse_worker, check_out
from shardlax._launch import elapsed, phase


def _request_cpu_devices(n: int) -> None:
    """Ask for `n` simulated CPU devices before JAX starts (the demo asks, never the library)."""
    import jax

    on_cpu = os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu")
    if on_cpu and jax.config.jax_num_cpu_devices < n:
        # RuntimeError: a backend already started (e.g. under pytest): use what there is
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", n)


# ------------------------------------------------------------------ the command


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    data, fsdp, model = args.mesh
    n = data * fsdp * model
    worker = None if args.worker is None else _parse_worker(args.worker)
    if worker is None or worker[0] == 0:
        args.out = check_out(args.out)
    if args.processes > 1 and worker is None:
        from shardlax import _launch

        print(
            f"starting {args.processes} processes with {n // args.processes} CPU devices each, "
            f"joined on 127.0.0.1 (process 0's output follows)",
            flush=True,
        )
        return _launch.spawn(
            argv,
            num_processes=args.processes,
            devices_per_process=n // args.processes,
            timeout=args.timeout,
        )
    print(
        f"[{elapsed():6.1f} s] python, jax, flax and shardlax imported; flags checked", flush=True
    )
    if worker is not None:
        from shardlax import _launch

        pid, count, coordinator, devices = worker
        _launch.initialize_worker(pid, count, coordinator, devices, timeout=int(args.timeout))
    else:
        _request_cpu_devices(n)
    import jax

    if jax.device_count() < n:
        raise _fail(
            "--mesh", args.mesh,
            f"the mesh needs {n} devices but JAX has {jax.device_count()} "
            f"({jax.devices()[0].platform}; a backend that has started cannot add CPU devices)",
            f"Use a mesh of at most {jax.device_count()} devices, or run in a fresh process.",
        )  # fmt: skip
    phase(
        f"JAX {jax.__version__} ready: {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {jax.process_count()} process(es)"
    )
    if args.model == "mlp":
        from shardlax import _demo_mlp

        result = _demo_mlp.run(args)
    else:
        from shardlax import _demo_lm

        result = _demo_lm.run(args)
    return 0 if result["ok"] else 1
