"""Run the demo as several local processes joined by `jax.distributed.initialize`.

`python -m shardlax demo --processes 2` starts 2 copies of itself on this
host, each with `devices // 2` simulated CPU devices, joined through JAX's
own coordination service on 127.0.0.1 and its CPU collectives (gloo). The
mesh spans both processes; the kernels do not change.

On a real cluster the same worker runs once per host, with the coordinator
on host 0 (see the README): there `jax.distributed.initialize()` reads the
coordinator address, process count and process id from the cluster's
environment (SLURM, Kubernetes, Cloud TPU) and the accelerator platform
provides the devices, so no device-count request is made.

It also holds what the command line shares with the demos: the clock of the
phase lines and the error a bad flag raises.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), else 0 (then: since this import)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


#: the demo's clock: phase lines show seconds since the process started (`python -m
#: shardlax` imports the package, and so jax and flax, before this module runs)
START = time.perf_counter() - _process_age()


def elapsed() -> float:
    """Seconds since the process started."""
    return time.perf_counter() - START


class FlagError(ValueError):
    """A demo flag whose value cannot work; the message names flag, value, rule and fix."""


def phase(message: str) -> None:
    """One progress line on process 0: seconds since the process started, then what happens."""
    import jax

    if jax.process_index() == 0:
        print(f"[{elapsed():6.1f} s] {message}", flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_worker(process_id: int, num_processes: int, coordinator: str, devices: int,
                      timeout: int) -> None:  # fmt: skip
    """In a worker, before any JAX computation: ask for CPU devices, join the others."""
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
    )


def spawn(
    worker_argv: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int,
    timeout: float,
) -> int:
    """Run `python -m shardlax <worker_argv>` as `num_processes` joined processes.

    Process 0's output is relayed to this process's stdout as it comes; the
    others' is shown only if they fail. Every child is killed after `timeout`
    seconds (a peer that never arrives makes JAX abort, not raise, so the
    parent is what bounds the run).

    Returns:
      0 if every process exited 0, else the first non-zero exit code (124 on timeout).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # each worker asks for its own devices
    procs = []
    for pid in range(num_processes):
        cmd = [
            sys.executable, "-m", "shardlax", *worker_argv,
            "--worker", f"{pid},{num_processes},{coordinator},{devices_per_process}",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
                start_new_session=True,
            )
        )
    logs: list[list[str]] = [[] for _ in procs]
    sel = selectors.DefaultSelector()
    for i, p in enumerate(procs):
        sel.register(p.stdout, selectors.EVENT_READ, i)
    deadline = time.monotonic() + timeout
    open_streams = len(procs)
    timed_out = False
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(left, 1.0)):
            line = key.fileobj.readline()
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            i = key.data
            logs[i].append(line)
            if i == 0 and not line.startswith("[Gloo]"):
                sys.stdout.write(line)
                sys.stdout.flush()
    if timed_out:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        print(f"\nshardlax: processes did not finish within {timeout:.0f} s; killed.")
        return 124
    codes = [p.wait() for p in procs]
    for i, code in enumerate(codes):
        if code != 0:
            tail = "".join(line for line in logs[i][-40:] if not line.startswith("[Gloo]"))
            print(f"\nshardlax: process {i} exited with {code}; its last output:\n{tail}")
    return next((c for c in codes if c != 0), 0)
