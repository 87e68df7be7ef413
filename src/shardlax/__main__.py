"""Command line: `python -m shardlax demo [...]`.

`demo` trains TinyLM (built only from shardlax layers) on a (data, fsdp, model)
mesh of simulated CPU devices and on one device from the same initial
parameters, and shows that the two agree, which collectives ran, and what
each device holds. `demo --model mlp` runs the smaller column -> row MLP check.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _mesh(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--mesh {text!r}: expected DATA,FSDP,MODEL sizes, e.g. 2,2,2"
        )
    return parts  # type: ignore[return-value]


def _request_cpu_devices(n: int) -> None:
    """Ask for `n` simulated CPU devices before JAX starts (the demo asks, never the library)."""
    import jax

    on_cpu = os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu")
    if on_cpu and jax.config.jax_num_cpu_devices < n:
        # RuntimeError: a backend already started (e.g. under pytest): use what there is
        with contextlib.suppress(RuntimeError):
            jax.config.update("jax_num_cpu_devices", n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shardlax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train TinyLM sharded and on one device, compare, audit",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--model",
        choices=["lm", "mlp"],
        default="lm",
        help="TinyLM training demo, or the column -> row MLP check",
    )
    demo.add_argument(
        "--mesh",
        type=_mesh,
        default=(2, 2, 2),
        help="DATA,FSDP,MODEL mesh sizes; their product is the device count",
    )
    demo.add_argument("--steps", type=int, default=200, help="training steps")
    demo.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    demo.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    demo.add_argument("--d-model", type=int, default=64, help="model width")
    demo.add_argument("--layers", type=int, default=2, help="transformer blocks (scanned)")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--kv-heads", type=int, default=0, help="key/value heads (0: = heads)")
    demo.add_argument("--vocab", type=int, default=64, help="vocabulary size")
    demo.add_argument("--order", type=int, default=2, help="n of the synthetic n-gram language")
    demo.add_argument(
        "--branching",
        type=int,
        default=4,
        help="tokens that can follow each context in the language",
    )
    demo.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="shard activations over the sequence between blocks (Megatron-SP)",
    )
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    demo.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    demo.add_argument("--seed", type=int, default=0, help="parameter seed")
    demo.add_argument(
        "--rtol",
        type=float,
        default=1e-4,
        help="max relative loss difference, sharded vs 1 device, to call them equal",
    )
    demo.add_argument("--log-every", type=int, default=20, help="print every N steps")
    demo.add_argument("--out", default="shardlax-demo", help="folder for loss.png and demo.json")
    demo.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run as N local processes joined by jax.distributed on 127.0.0.1",
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="with --processes: kill every process after this many seconds",
    )
    demo.add_argument("--d-ff", type=int, default=0, help=argparse.SUPPRESS)
    demo.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    data, fsdp, model = args.mesh
    n = data * fsdp * model
    if args.processes > 1 and args.worker is None:
        if n % args.processes:
            print(
                f"demo --processes {args.processes}: the mesh {args.mesh} has {n} devices, "
                f"which {args.processes} processes cannot share evenly. Choose a mesh whose "
                f"size is a multiple of {args.processes}."
            )
            return 2
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
    if args.worker is not None:
        from shardlax import _launch

        pid, count, host, port, devices = args.worker.replace(":", ",").split(",")
        _launch.initialize_worker(
            int(pid), int(count), f"{host}:{port}", int(devices), timeout=int(args.timeout)
        )
    else:
        _request_cpu_devices(n)
    if args.model == "mlp":
        from shardlax import _demo_mlp

        result = _demo_mlp.run(args)
    else:
        from shardlax import _demo_lm

        result = _demo_lm.run(args)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        try:
            return _demo(args, argv)
        except (ValueError, TypeError) as e:  # bad flags reach the layers' checks
            print(f"shardlax demo: {e}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
