"""Outputs of the collectives benchmark: the markdown tables and the PNG plot."""

from __future__ import annotations

from pathlib import Path

import _common as C

COLLECTIVES = ("psum", "all_gather", "psum_scatter", "ppermute", "all_to_all")
HLO_KIND = {
    "psum": "all-reduce",
    "all_gather": "all-gather",
    "psum_scatter": "reduce-scatter",
    "ppermute": "collective-permute",
    "all_to_all": "all-to-all",
}


def short_size(n: int) -> str:
    """64K, 1M, 16M: tick labels."""
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return str(n)


def n_devices_note(devices: list[int], size: int) -> str:
    return f"up to {max(devices)} x {short_size(size)} = {short_size(max(devices) * size)} in all"


def markdown(rows: list[dict]) -> str:
    info = rows[0]["machine"]
    by = {(r["collective"], r["impl"], r["devices"], r["size_bytes"]): r for r in rows}
    devices = sorted({r["devices"] for r in rows})
    sizes = sorted({r["size_bytes"] for r in rows})
    names = [c for c in COLLECTIVES if any(r["collective"] == c for r in rows)]
    big = sizes[-1]
    out = [
        "# Collectives: shardlax.kernels vs jax.lax",
        "",
        f"Machine: {C.machine_line(info)}.",
        "Baseline: the raw `jax.lax` collective in the same `shard_map` (no GSPMD here: "
        "a single collective has no sharding choices to propagate).",
        f"One process; n-device runs use the first n devices. {C.SIMULATED_NOTE}",
        "",
        "busbw follows nccl-tests (all-reduce x 2(n-1)/n; all-gather, reduce-scatter, "
        "all-to-all x (n-1)/n; permute x 1); `agg/ceiling` = n * busbw over the aggregate "
        "bandwidth of a plain copy of the same size on the same n devices, timed "
        "interleaved with the collective. Times are medians (p90 in the full table) of "
        f"{rows[0]['n']} calls after warm-up; compile excluded. `audit` checks the compiled "
        "HLO holds exactly one collective of the expected kind moving S bytes; `same HLO` "
        "compares the compiled instructions of the shardlax and jax.lax programs (source "
        "metadata stripped): when they are equal, any time difference between the two "
        "columns is measurement noise.",
        "",
        f"## Summary at S = {C.fmt_bytes(big)} per device",
        "",
    ]
    summary = []
    for name in names:
        for n in devices:
            k, lx = by.get((name, "shardlax", n, big)), by.get((name, "lax", n, big))
            if not k or not lx:
                continue
            summary.append(
                [
                    name,
                    n,
                    C.fmt_time(k["median_s"]),
                    C.fmt_time(lx["median_s"]),
                    f"{k['median_s'] / lx['median_s']:.2f}",
                    f"{k['busbw_GBps']:.2f}",
                    f"{k['agg_busbw_GBps']:.2f}",
                    f"{k['ceiling_agg_GBps']:.2f}",
                    f"{k['agg_busbw_over_ceiling']:.2f}",
                    "ok" if k["audit_ok"] and lx["audit_ok"] else "MISMATCH",
                    "yes" if k["same_hlo_as_lax"] else "no",
                ]
            )
    out.append(
        C.md_table(
            [
                "collective",
                "n",
                "shardlax",
                "jax.lax",
                "shardlax/lax",
                "busbw GB/s",
                "agg busbw GB/s",
                "memcpy GB/s (agg)",
                "agg/ceiling",
                "audit",
                "same HLO",
            ],
            summary,
        )
    )
    if big > 16 * 1024**2:
        out += [
            "",
            f"Above 16 MiB per device ({n_devices_note(devices, big)}), the collective and the "
            "copy both allocate fresh output buffers whose first touch page-faults: these "
            "times measure the kernel's page-fault path more than copying. Compare them with "
            "the ceiling of the same size only.",
        ]
    out += ["", "## All sizes", ""]
    full = []
    for name in names:
        for n in devices:
            for s in sizes:
                k, lx = by.get((name, "shardlax", n, s)), by.get((name, "lax", n, s))
                if not k or not lx:
                    continue
                full.append(
                    [
                        name,
                        n,
                        C.fmt_bytes(s),
                        f"{C.fmt_time(k['median_s'])} / {C.fmt_time(k['p90_s'])}",
                        f"{C.fmt_time(lx['median_s'])} / {C.fmt_time(lx['p90_s'])}",
                        f"{k['median_s'] / lx['median_s']:.2f}",
                        f"{k['algbw_GBps']:.2f}",
                        f"{k['busbw_GBps']:.2f}",
                        f"{k['agg_busbw_over_ceiling']:.2f}",
                        f"{k['audit_bytes']:,}",
                        f"{k['audit_wire_bytes']:,.0f}",
                    ]
                )
    out.append(
        C.md_table(
            [
                "collective",
                "n",
                "S",
                "shardlax med / p90",
                "jax.lax med / p90",
                "ratio",
                "algbw GB/s",
                "busbw GB/s",
                "agg/ceiling",
                "HLO bytes",
                "wire bytes",
            ],
            full,
        )
    )
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in COLLECTIVES if any(r["collective"] == c for r in rows)]
    devices = sorted({r["devices"] for r in rows})
    sizes = sorted({r["size_bytes"] for r in rows})
    colors = dict(zip(devices, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for n in devices:
            for impl, style in (("shardlax", "-o"), ("lax", "--x")):
                rs = sorted(
                    (
                        r
                        for r in rows
                        if r["collective"] == name and r["devices"] == n and r["impl"] == impl
                    ),
                    key=lambda r: r["size_bytes"],
                )
                if not rs:
                    continue
                xs = [r["size_bytes"] for r in rs]
                ax.plot(
                    xs,
                    [r["agg_busbw_GBps"] for r in rs],
                    style,
                    color=colors[n],
                    ms=4,
                    lw=1.4,
                    label=f"n={n} {'shardlax' if impl == 'shardlax' else 'jax.lax'}",
                )
                if impl == "shardlax":
                    ax.plot(
                        xs,
                        [r["ceiling_agg_GBps"] for r in rs],
                        ":",
                        color=colors[n],
                        lw=2,
                        alpha=0.7,
                        label=f"n={n} memcpy ceiling",
                    )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} ({HLO_KIND[name]})")
        ax.set_xlabel("message size per device (bytes)")
        ax.set_ylabel("aggregate bus bandwidth (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ticks = sizes[:: -(-len(sizes) // 5)]
        ax.set_xticks(ticks, [short_size(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    legend_ax = list(axes.flat)[len(names)] if len(names) < nrows * ncols else None
    if legend_ax is not None:
        legend_ax.legend(handles, labels, loc="center", fontsize=9, frameon=False)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(devices), fontsize=8)
    info = rows[0]["machine"]
    fig.suptitle(
        "Collectives: aggregate busbw (n x nccl-tests busbw) vs memcpy ceiling\n"
        f"{info['device_count']} simulated CPU devices on {info['cpu_count']} cores "
        "(one shared memory system), jax " + info["jax"],
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
