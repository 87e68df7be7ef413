"""Outputs of the layer benchmark: the markdown tables and the PNG plot."""

from __future__ import annotations

from pathlib import Path

import _common as C
from _steps import IMPLS


def _kinds(k: dict) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
             "all-to-all": "A2A", "collective-permute": "CP"}  # fmt: skip
    return " ".join(f"{v} {short.get(kind, kind)}" for kind, v in sorted(k.items())) or "none"


def _ratio(r: dict, key: str) -> str:
    if key not in r:
        return "-"
    if f"{key}_p10" in r:
        return f"{r[key]:.2f} ({r[key + '_p10']:.2f}-{r[key + '_p90']:.2f})"
    return f"{r[key]:.2f}"


def _min_kinds(mins: list[dict]) -> dict:
    out: dict[str, int] = {}
    for m in mins:
        out[m["kind"]] = out.get(m["kind"], 0) + m["count"]
    return out


def markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    info = rows[0]["machine"] if rows else C.machine_info()
    out = [
        "# Layers and train steps: shardlax vs GSPMD vs one device",
        "",
        f"GSPMD baseline: the {C.GSPMD_BASELINE} (per row below).",
        "",
        f"Machine: {C.machine_line(info)}. {C.SIMULATED_NOTE}",
        "",
        "Each row is one Adam train step (loss, gradients, update; state donated and carried). "
        "Times are medians of interleaved runs (shardlax, gspmd, unsharded, shardlax, ...); "
        "a step-time ratio is the median of the per-round ratios (each round runs the three "
        "back to back), with their p10-p90 after it. Compile = trace + lower + compile, the "
        "median of cold compiles (caches cleared before each). Collectives are read from "
        "the compiled HLO: tensors moved per step "
        "(AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all), S = bytes per "
        "device (nccl-tests size), wire = bytes each device sends with ring algorithms "
        "(all-reduce 2S(n-1)/n, others S(n-1)/n), collectives inside a scan counted once per "
        "iteration; `minimum` is the least the strategy needs (see the module docstring). "
        "Memory is `memory_analysis()` per device. The last column counts the compiled "
        "instructions of the shardlax program with no identical instruction in the GSPMD "
        "program (names and source metadata ignored): a handful means the same program.",
        "",
        "## Ratios",
        "",
    ]
    by = {(r["row"], r["devices"], r["impl"]): r for r in rows}
    order = list(dict.fromkeys(r["row"] for r in rows))
    keys = sorted(
        dict.fromkeys((r["row"], r["devices"]) for r in rows),
        key=lambda k: (order.index(k[0]), k[1]),
    )
    ratio_rows = []
    for name, n in keys:
        s, g, u = (by.get((name, n, i)) for i in IMPLS)
        if not s:
            continue
        ratio_rows.append([
            f"{name} ({s['mesh']})",
            _ratio(s, "ratio_vs_gspmd"), _ratio(s, "ratio_vs_unsharded"),
            _ratio(s, "compile_ratio_vs_gspmd"), _ratio(s, "compile_ratio_vs_unsharded"),
            f"{C.fmt_bytes(s['collectives']['executed_wire_bytes'])} / "
            f"{C.fmt_bytes(g['collectives']['executed_wire_bytes']) if g else '-'} / "
            f"{C.fmt_bytes(s['minimum_wire_bytes'])}",
            " / ".join(C.fmt_bytes(r["memory"]["temp"]) if r else "-" for r in (s, g, u)),
            f"{s.get('hlo_differing_vs_gspmd', '-')} of {s.get('hlo_instructions', '-')}",
        ])  # fmt: skip
    out.append(C.md_table(
        ["row (mesh)", "step shardlax/GSPMD", "step shardlax/unsharded",
         "compile shardlax/GSPMD", "compile shardlax/unsharded",
         "wire bytes/device shardlax / GSPMD / min", "temp/device shardlax / GSPMD / unsharded",
         "HLO instructions differing from GSPMD"],
        ratio_rows,
    ))  # fmt: skip
    out += ["", "## GSPMD baseline of each row", ""]
    seen_rows: dict[str, str] = {}
    for r in rows:
        if r["impl"] == "shardlax":
            seen_rows.setdefault(r["row"], r.get("gspmd_baseline") or "unconstrained GSPMD")
    out += [f"- `{name}`: {text}" for name, text in seen_rows.items()]
    out += ["", "## Every candidate", ""]
    full = []
    for name, n in keys:
        for impl in IMPLS:
            r = by.get((name, n, impl))
            if not r:
                continue
            col = r["collectives"]
            full.append([
                name, impl, r["mesh"], C.fmt_time(r["median_s"]),
                f"{C.fmt_time(r['p10_s'])}-{C.fmt_time(r['p90_s'])}",
                f"{r['lower_s'] + r['compile_s']:.2f} s",
                f"{col['tensors']} ({_kinds(col['kinds'])})",
                C.fmt_bytes(col["executed_bytes"]), C.fmt_bytes(col["executed_wire_bytes"]),
                C.fmt_bytes(r["memory"]["arguments"]), C.fmt_bytes(r["memory"]["temp"]),
                f"{r['loss']:.6g}",
            ])  # fmt: skip
        s = by.get((name, n, "shardlax"))
        if s:
            mins = s["minimum"]
            full.append([
                name, f"*{s['reference']}*", "", "", "", "",
                f"{s['minimum_tensors']} ({_kinds(_min_kinds(mins))})",
                C.fmt_bytes(s["minimum_bytes"]), C.fmt_bytes(s["minimum_wire_bytes"]),
                "", "", "",
            ])  # fmt: skip
    out.append(C.md_table(
        ["row", "impl", "mesh", "step median", "p10-p90", "compile", "collectives / step",
         "S bytes/device", "wire bytes/device", "args/device", "temp/device", "loss"],
        full,
        align="lllrrrrrrrrr",
    ))  # fmt: skip
    out += [
        "",
        "## Theoretical minimum per row",
        "",
        "(tinylm: the collectives `TinyLM.declared_collectives` lists for one step, blocks "
        "counted once per layer: the design's own count, which GSPMD may undercut.)",
        "",
    ]
    for name, n in keys:
        r = by.get((name, n, "shardlax"))
        if r:
            items = "; ".join(
                f"{m['count']} x {m['kind']} over {','.join(m['axes'])} of "
                f"{C.fmt_bytes(m['bytes'])} ({m['why']})"
                for m in r["minimum"]
            )
            out.append(f"- **{name}** ({r['strategy']}; {r['config']}): {items}")
    if skipped:
        out += ["", "## Rows not run", ""]
        out += [f"- **{k}**: {v}" for k, v in skipped.items()]
    return "\n".join(out) + "\n"


def _bars(ax, labels, series, title, ylabel, log=False):
    """Grouped bars, one group per label: `series` is [(legend, values, errors, style)]."""
    width = 0.84 / len(series)
    for i, (legend, ys, err, style) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, ys, width, label=legend, yerr=err, capsize=2 if err else 0,
                      error_kw={"lw": 0.8}, **style)  # fmt: skip
        if len(series) <= 3:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", lw=1)
    if log:
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib_ticker().FormatStrFormatter("%g"))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["row"], r["devices"], r["impl"]): r for r in rows}
    devices = sorted({r["devices"] for r in rows})
    order = [
        name for name in dict.fromkeys(r["row"] for r in rows)
        if any(all((name, n, i) in by for i in IMPLS) for n in devices)
    ]  # fmt: skip
    if not order:
        return
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [name.replace("_", "\n", 1) for name in order]
    nan = float("nan")

    def get(name, n, impl, fn):
        r = by.get((name, n, impl))
        return fn(r) if r is not None and (name, n, "shardlax") in by else nan

    def ratio_series(key):
        out = []
        for j, n in enumerate(devices):
            ys = [get(name, n, "shardlax", lambda r: r[key]) for name in order]
            lo = [get(name, n, "shardlax", lambda r: r[key] - r[key + "_p10"]) for name in order]
            hi = [get(name, n, "shardlax", lambda r: r[key + "_p90"] - r[key]) for name in order]
            err = [[max(0.0, v) for v in lo], [max(0.0, v) for v in hi]]
            out.append((f"{n} devices", ys, err, {"color": colors[j]}))
        return out

    def per_impl(fn):
        out = []
        for j, n in enumerate(devices):
            for impl, hatch in (("shardlax", None), ("gspmd", "//")):
                ys = [
                    get(name, n, impl, lambda r, name=name, n=n: fn(r, name, n)) for name in order
                ]
                style = {
                    "color": colors[j],
                    "hatch": hatch,
                    "edgecolor": "white" if hatch else None,
                }
                out.append((f"{n} dev {'GSPMD' if hatch else 'shardlax'}", ys, None, style))
        return out

    def wire(r, name, n):
        return (
            r["collectives"]["executed_wire_bytes"] / by[name, n, "shardlax"]["minimum_wire_bytes"]
        )

    def mem(r, name, n):
        u = by[name, n, "unsharded"]["memory"]
        return (r["memory"]["arguments"] + r["memory"]["temp"]) / (u["arguments"] + u["temp"])

    fig, axes = plt.subplots(2, 2, figsize=(max(12, 2.2 * len(order) + 2), 8))
    _bars(axes[0, 0], labels, ratio_series("ratio_vs_gspmd"),
          "step time shardlax / GSPMD (median of per-round ratios, p10-p90)",
          "ratio (< 1: shardlax faster)", log=True)  # fmt: skip
    _bars(axes[0, 1], labels, ratio_series("ratio_vs_unsharded"),
          "step time shardlax / one device (simulated devices share 2 cores)",
          "ratio (< 1: shardlax faster)", log=True)  # fmt: skip
    _bars(axes[1, 0], labels, per_impl(wire),
          "collective bytes sent per device / minimum (tinylm: / declared; hatched: GSPMD)",
          "ratio (1 = minimum)")  # fmt: skip
    _bars(
        axes[1, 1],
        labels,
        per_impl(mem),
        "memory per device (arguments + temp) / one device (hatched: GSPMD)",
        "ratio",
    )
    info = rows[0]["machine"]
    fig.suptitle(
        f"Train steps: shardlax vs GSPMD vs one device -- simulated CPU devices on "
        f"{info['cpu_count']} cores, jax {info['jax']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
