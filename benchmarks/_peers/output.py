"""peers.md tables, the targets' check, peers.png (quality against stored bits, a panel per task)."""

import json
from pathlib import Path

RPQ = "rpq_fx"
STYLE = {RPQ: ("tab:green", "s"), "torchao": ("tab:blue", "o"), "optimum-quanto": ("tab:purple", "^"),
         "hqq": ("tab:brown", "v"), "RTN (here)": ("tab:orange", "D")}


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("error") is None and r["library"] != "dense"]


def budget_check(rows: list[dict], key: str, max_bits: float = 4.0) -> list[dict]:
    """At each stored-bit budget <= ``max_bits`` that some row sits at: rpq_fx's best row within the
    budget against every other method's best within it; ``holds`` when rpq_fx's is at least as good
    (or no other method fits the budget)."""
    ok = _ok(rows)
    out = []
    for budget in sorted({r["bits_per_weight"] for r in ok if r["bits_per_weight"] <= max_bits}):
        fits = [r for r in ok if r["bits_per_weight"] <= budget]
        mine = max((r for r in fits if r["library"] == RPQ), key=lambda r: r[key], default=None)
        peer = max((r for r in fits if r["library"] != RPQ), key=lambda r: r[key], default=None)
        out.append({"budget": budget, "rpq": mine, "peer": peer,
                    "holds": peer is None or (mine is not None and mine[key] >= peer[key])})
    return out


def above(rows: list[dict], key: str, threshold: float, max_bits: float) -> list[dict]:
    """The rows at <= ``max_bits`` stored bits whose ``key`` is above ``threshold``."""
    return [r for r in _ok(rows) if r["bits_per_weight"] <= max_bits and r[key] > threshold]


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def task_table(task: dict, table) -> str:
    keys = list(task["metrics"])
    headers = ["library", "version", "method", "setting", "stored bits / weight", "weights covered (share of values)",
               *task["metrics"].values(), "model MiB", "quantize s (CPU s)", "latency b=1", "latency b=32"]
    rows, errors = [], []
    for r in task["rows"]:
        if r.get("error"):
            errors.append(f"- {r['library']} {r['version']}, {r['method']}, {r['setting']}: {r['error']}")
            continue
        if r.get("lat_error"):
            errors.append(f"- {r['library']} {r['version']}, {r['method']}, {r['setting']}: ran, but its latency "
                          f"could not be measured again: {r['lat_error']}")
        share = r.get("covered_weights")
        rows.append([r["library"], r["version"], r["method"], r["setting"], f"{r['bits_per_weight']:.3f}",
                     r["covered"] if share is None else f"{r['covered']} ({100 * share:.0f}%)",
                     *(f"{r[k]:.4f}" for k in keys), f"{r['model_mib']:.2f}",
                     "—" if r.get("quant_s") is None else f"{r['quant_s']:.1f} ({r['quant_cpu_s']:.1f})",
                     _fmt(r.get("lat1"), ".2f"), _fmt(r.get("lat32"), ".2f")])
    dense = next(r for r in task["rows"] if r["library"] == "dense")
    text = (f"## {task['title']}\n\n{task['notes']}\n\nDense fp32 latency in this process: batch 1 "
            f"{dense['lat1_ms']:.2f} ms ({dense['lat1_cpu_ms']:.2f} ms CPU), batch 32 {dense['lat32_ms']:.1f} ms "
            f"({dense['lat32_cpu_ms']:.1f} ms CPU); `latency` columns are each method's time over dense's "
            f"(below 1 is faster), measured interleaved with dense{timing_text(task.get('latency'))}.\n\n"
            + table(rows, headers, disable_numparse=True, colalign=["left"] * 4 + ["right"] * (len(headers) - 4))
            + "\n")
    if errors:
        text += "\nRan on this task with an error, or not at all (a peer that cannot run is a result):\n\n" \
                + "\n".join(errors) + "\n"
    return text


def timing_text(meta: dict | None) -> str:
    """When, how and at what load a task's latency columns were measured (older runs kept none)."""
    if not meta:
        return ""
    low, high = meta.get("lat_load_min"), meta.get("lat_load_max")
    during = "" if low is None else f", {low:.2f}-{high:.2f} (1 min) while timing"
    return (f"; timed {meta['date']} by `{meta['command']}` with {meta['threads']} threads, load average "
            f"{meta['load_before']} before{during}, {meta['load_after']} after")


def targets_text(task: dict, key: str | None = None) -> str:
    """The budget check of ``task`` on metric ``key`` (default: the plotted one) as a Markdown table."""
    key = key or task["plot_metric"]
    label = task["metrics"][key]
    lines = []
    for c in budget_check(task["rows"], key):
        mine = "none" if c["rpq"] is None else f"{c['rpq']['setting']} {c['rpq'][key]:.4f}"
        peer = "none" if c["peer"] is None else f"{c['peer']['library']} {c['peer']['setting']} {c['peer'][key]:.4f}"
        lines.append(f"| {c['budget']:.3f} | {mine} | {peer} | {'yes' if c['holds'] else '**no**'} |")
    return (f"**{task['title']}** ({label}), best within each budget:\n\n| stored bits <= | rpq_fx's best | "
            "best other method | rpq_fx best? |\n|---|---|---|---|\n" + "\n".join(lines) + "\n")


def write_json(path: Path, meta: dict, tasks: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=1, default=str) + "\n")


def plot(path: Path, tasks: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(max(7.5, 5.6 * len(tasks)), 5.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = task["plot_metric"]
        dense = next(r for r in task["rows"] if r["library"] == "dense")
        ax.axhline(dense[key], color="black", linestyle="--", linewidth=1, label="dense fp32")
        for library, (color, marker) in STYLE.items():
            rows = sorted((r for r in _ok(task["rows"]) if r["library"] == library), key=lambda r: r["bits_per_weight"])
            if rows:
                ax.scatter([r["bits_per_weight"] for r in rows], [r[key] for r in rows], color=color, marker=marker,
                           s=40, label=library, zorder=3)
                for r in rows:
                    ax.annotate(r["short"], (r["bits_per_weight"], r[key]), fontsize=5.5, color=color,
                                xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32], ["1", "2", "4", "8", "16", "32"])
        ax.set_xlabel("stored bits per selected weight (log2)")
        ax.set_ylabel(task["metrics"][key])
        ax.set_title(task["title"], fontsize=9)
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend),  loc="lower center", ncol=min(len(legend), 4 * len(tasks)),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
