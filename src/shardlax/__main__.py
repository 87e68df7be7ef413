"""Command line: `python -m shardlax demo [...]`.

`demo` trains TinyLM (built only from shardlax layers) on a (data, fsdp, model)
mesh of simulated CPU devices and on one device from the same initial
parameters, and shows that the two agree, which collectives ran, and what
each device holds. `demo --model mlp` runs the smaller column -> row MLP check.

Every flag is checked before JAX starts: a bad value exits with status 2 and
one line on stderr naming the flag, the value, the rule and a fix.
"""

from __future__ import annotations

import argparse
import sys

from shardlax._cli_demo import _demo
from shardlax._cli_flags import check_checkpoint_flags as check_checkpoint_flags
from shardlax._cli_flags import check_flags
from shardlax._cli_flags import check_out as check_out
from shardlax._launch import FlagError


def _mesh(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(
            f"--mesh {text!r}: expected three positive DATA,FSDP,MODEL sizes, e.g. --mesh 2,2,2"
        )
    return parts  # type: ignore[return-value]


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
    demo.add_argument("--d-ff", type=int, default=0, help="MLP hidden width (0: 4 x --d-model)")
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
        "--exact-steps",
        type=int,
        default=5,
        help="the first N steps must agree within the f32 tolerance (2e-5 relative)",
    )
    demo.add_argument(
        "--drift-factor",
        type=float,
        default=10.0,
        help="after those, the sharded run may drift from the one-device run at most this "
        "many times as far as a one-device run with permuted batch rows (the same math, "
        "another summation order) drifts by the same step",
    )
    demo.add_argument("--log-every", type=int, default=20, help="print every N steps")
    demo.add_argument(
        "--out", default="shardlax-demo", help="folder for demo.json (and loss.png for --model lm)"
    )
    demo.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="--model lm: save the sharded model and optimizer (logical layout) at the end",
    )
    demo.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="--model lm: start from a --save DIR written on any mesh (continues its steps)",
    )
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
    demo.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # compile-only scale-out study (shardlax.plan)
        from shardlax import plan

        return plan.main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "demo":
        parser.error(f"unknown command {args.command!r}")
    demo = _subparser(parser, "demo")
    if extra:
        demo.error(f"unrecognized arguments: {' '.join(extra)}")  # the demo's usage, exit 2
    try:
        check_flags(args)
        return _demo(args, argv)
    except FlagError as e:
        print(f"shardlax demo: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
