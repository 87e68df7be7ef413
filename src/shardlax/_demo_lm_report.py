"""What the TinyLM demo reports besides the losses.

demo.json's provenance (`versions`, `machine`, `flags`), the declared-vs-compiled
collectives as JSON rows, per-device bytes of a pytree, and the loss plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform

import jax
import numpy as np
import optax


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
