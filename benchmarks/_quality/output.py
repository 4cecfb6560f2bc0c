"""quality.md (a table per task), quality.json (every number), quality.png (metric against bits)."""

import json
from pathlib import Path

from .methods import RTN_METHOD

STYLE = {"random RPQ": ("tab:gray", "x"), "k-means": ("tab:blue", "o"), "data-aware": ("tab:green", "s"),
         "data-aware + fine-tuning": ("tab:red", "D"), RTN_METHOD: ("tab:orange", "^")}


def task_table(task: dict, table) -> str:
    """One task's Markdown: its notes, then one row per (method, setting)."""
    keys = list(task["metrics"])
    headers = ["method", "setting", "bits / weight", "index bits / weight", "model ratio", "model MiB",
               *task["metrics"].values(), "time s"]
    rows = [[r["method"], r["setting"], f"{r['bits_per_weight']:.3f}", f"{r['index_bits']:.3g}",
             f"{r['model_ratio']:.2f}", f"{r['model_mib']:.2f}", *(f"{r[k]:.4f}" for k in keys),
             f"{r['seconds']:.1f}"] for r in task["rows"]]
    return (f"## {task['title']}\n\n{task['notes']} {task['coverage']}\n\n" + table(rows, headers, disable_numparse=True,
                    colalign=["left", "left", *["right"] * (len(headers) - 2)]) + "\n")


def write_json(path: Path, meta: dict, tasks: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=1, default=str) + "\n")


def plot(path: Path, tasks: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key, label = next(iter(task["metrics"].items()))
        dense = next((r for r in task["rows"] if r["method"] == "dense"), None)
        if dense is not None:
            ax.axhline(dense[key], color="black", linestyle="--", linewidth=1, label="dense fp32")
        for method, (color, marker) in STYLE.items():
            rows = [r for r in task["rows"] if r["method"] == method]
            line = sorted((r for r in rows if r.get("num_codes", 256) == 256), key=lambda r: r["bits_per_weight"])
            if line:
                ax.plot([r["bits_per_weight"] for r in line], [r[key] for r in line], color=color, marker=marker,
                        label=method)
            odd = [r for r in rows if r.get("num_codes", 256) != 256]  # K=16: off the line, hollow marker
            if odd:
                hollow = dict(color=color) if marker == "x" else dict(facecolors="none", edgecolors=color)
                ax.scatter([r["bits_per_weight"] for r in odd], [r[key] for r in odd], marker=marker, s=60, **hollow)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("stored bits per quantised weight (log2)")
        ax.set_ylabel(label)
        ax.set_title(task["title"], fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.04), ncol=len(labels), fontsize=8,
               frameon=False)
    fig.text(0.5, 0.01, "hollow markers (x for random RPQ): d=1, K=16, scalar weight sharing (4 index bits, "
             "stored in a byte)", fontsize=7, ha="center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
