"""Command line: `python -m shardlax demo [...]`."""

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
    parser = argparse.ArgumentParser(prog="python -m shardlax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train and audit a model on simulated CPU devices",
        description="Build a model from shardlax layers on a (data, fsdp, model) mesh, check it "
        "against single-device math, and print its collectives, declared vs compiled.",
    )
    demo.add_argument("--model", choices=["mlp"], default="mlp",
                      help="which demo to run (default: %(default)s)")  # fmt: skip
    demo.add_argument("--mesh", type=_mesh, default=(2, 1, 4),
                      help="DATA,FSDP,MODEL mesh sizes (default: 2,1,4)")  # fmt: skip
    demo.add_argument("--d-model", type=int, default=256, help="model width (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=16, help="global batch (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        data, fsdp, model = args.mesh
        _request_cpu_devices(data * fsdp * model)
        from shardlax import _demo_mlp

        result = _demo_mlp.run(args)
        return 0 if result["ok"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
