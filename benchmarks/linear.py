"""The compressed-domain linear against a dense ``nn.Linear``, forward and forward+backward.

``RPQLinear`` computes ``y = x W^T`` per call either in the compressed domain (a table of each
input slice against every codeword, then a sum of C table entries per output: the weight is
never built) or by expanding the weight and calling ``F.linear``; ``auto`` (what ``RPQLinear``
and converted models do) picks by a cost model. Every variant is timed in one process against
``nn.Linear`` holding the same weight: medians of ``torch.utils.benchmark``, and the ratio
``dense time / variant time`` (above 1: faster than dense). ``unfused`` is how rpq_fx ran before
the compressed-domain op: ``F.linear(x, rpq_fx::expand(codebooks, codes), bias)`` under autograd
(which keeps the expanded weight for backward).

Calls are interleaved (each round times every variant once, in turn), so that a machine shared with other work
slows them alike; each figure is the median over the rounds of wall time, and the table gives the CPU time of
dense and auto beside it and the load average of each row. ``lut8`` is the opt-in forward through 8-bit lookup
tables (``path="lut8"``: 4-8% of the output's norm on fitted MiniLM layers, ``benchmarks/results/lut_error.md``;
its backward is the compressed one), never chosen by ``auto``.

Five layers: RPQ settings (4096x4096, 16 codebooks, d = 256, issue 19's targets) and the
product-quantization settings that fitting produces (4096x4096, one shared codebook of d = 8, 4
or 2 with 256 codewords, and d = 4 with 16; issue 23's targets: d = 4 at least 4x faster than
dense at batch 1 and never slower up to batch 64, d = 2 and 8 never slower up to batch 16). Forward+backward sets every gradient to None first (``zero_grad()``'s default), so
neither side pays for accumulating into an old gradient.

Writes ``benchmarks/results/linear_<device>.md`` and ``linear_<device>.png`` (latency against batch).

    python benchmarks/linear.py [--quick] [--min-run-time 0.2] [--device cpu] [--layers 0,2] [--batches 1,2]
                                [--threads 1]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, load, table, write  # noqa: E402

from rpq_fx.nn import RPQLinear  # noqa: E402
from rpq_fx.ops import choose_path, expand, linear  # noqa: E402

LAYERS = [
    # label, in, out, num_codebooks, shared, num_codes
    ("RPQ 4096x4096, C=16 (d=256)", 4096, 4096, 16, False, 256),
    ("PQ 4096x4096, d=8 shared", 4096, 4096, 512, True, 256),
    ("PQ 4096x4096, d=4 shared", 4096, 4096, 1024, True, 256),
    ("PQ 4096x4096, d=2 shared", 4096, 4096, 2048, True, 256),
    ("PQ 4096x4096, d=4 shared, K=16", 4096, 4096, 1024, True, 16),
]
VARIANTS = ("expand", "compressed", "auto", "lut8")
TARGETS = {  # (layer index, mode, batch) -> minimum dense / auto speed-up, from issues 19 and 23
    (0, "inference", 1): 5.0, (0, "inference", 8): 5.0, (0, "inference", 512): 4.0,
    (0, "forward+backward", 512): 2.0, (2, "inference", 1): 4.0,
    **{(2, "inference", b): 1.0 for b in (2, 4, 8, 16, 32, 64)},
    **{(i, "inference", b): 1.0 for i in (1, 3) for b in (1, 2, 4, 8, 16)},
}


def interleaved_ms(calls: dict, min_run_time: float, min_rounds: int = 7) -> dict:
    """``{name: (median wall ms, median CPU ms)}``: rounds that call each function once in turn, after one warm-up
    call each, until every function has run ``min_run_time`` seconds and ``min_rounds`` rounds."""
    for fn in calls.values():
        fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    while min(len(v) for v in wall.values()) < min_rounds or min(spent.values()) < min_run_time:
        for name, fn in calls.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            c, w = time.process_time() - c, time.perf_counter() - w
            wall[name].append(w)
            cpu[name].append(c)
            spent[name] += w
    return {name: (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3) for name in calls}


def timings(layer: RPQLinear, dense: nn.Linear, batch: int, device, min_run_time: float) -> dict:
    cb, codes, bias = layer.weight.codebooks, layer.weight.codes, layer.bias
    x = torch.randn(batch, layer.in_features, device=device)
    grad = torch.randn(batch, layer.out_features, device=device)
    x_grad = x.clone().requires_grad_()
    params = [cb, bias, *dense.parameters(), x_grad]

    def step(fn):
        def run():
            for p in params:
                p.grad = None
            fn(x_grad).backward(grad)
        return run

    calls = {"dense": dense, "unfused": lambda x: torch.nn.functional.linear(x, expand(cb, codes), bias),
             **{v: (lambda x, v=v: linear(x, cb, codes, bias, v)) for v in VARIANTS}}
    out = {"load": os.getloadavg()[0]}
    with torch.inference_mode():
        for name, (wall, cpu) in interleaved_ms({n: (lambda fn=fn: fn(x)) for n, fn in calls.items()},
                                                min_run_time).items():
            out[("inference", name)], out[("inference cpu", name)] = wall, cpu
    for name, (wall, cpu) in interleaved_ms({n: step(fn) for n, fn in calls.items()}, min_run_time).items():
        out[("forward+backward", name)], out[("forward+backward cpu", name)] = wall, cpu
    out["choice"] = (choose_path(x, cb, codes), choose_path(x, cb, codes, backward=True))
    return out


def plot(results: dict, batches: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"dense": ("k", "o"), "unfused": ("tab:gray", "x"), "expand": ("tab:orange", "s"),
              "compressed": ("tab:blue", "^"), "auto": ("tab:green", ""), "lut8": ("tab:red", "v")}
    labels = [label for label, *_rest in LAYERS if label in results]
    fig, axes = plt.subplots(len(labels), 2, figsize=(11, 4.2 * len(labels)), squeeze=False)
    for row, label in enumerate(labels):
        for col, mode in enumerate(("inference", "forward+backward")):
            ax = axes[row][col]
            for name, (color, marker) in styles.items():
                ys = [results[label][b][(mode, name)] for b in batches]
                legend = {"auto": "auto (chosen per call)", "lut8": "lut8 (opt-in, approximate)"}.get(name, name)
                ax.plot(batches, ys, color=color, marker=marker or None, label=legend,
                        linestyle="--" if name == "auto" else "-", linewidth=1.5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{label}: {mode}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="batches 1, 2, 8, 16, 64, 512 only, shorter runs")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (overrides --quick's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine")
    parser.add_argument("--layers", default=None, help="comma-separated indices into LAYERS (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = range(len(LAYERS)) if args.layers is None else [int(i) for i in args.layers.split(",")]
    device = torch.device(args.device)
    batches = [1, 2, 8, 16, 64, 512] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    min_run_time = 0.05 if args.quick else args.min_run_time
    started = load()
    torch.manual_seed(0)
    results, rows = {}, []
    for index, (label, fin, fout, c, shared, k) in enumerate(LAYERS):
        if index not in chosen:
            continue
        layer = RPQLinear(fin, fout, c, shared_codebooks=shared, num_codes=k, device=device)
        dense = nn.Linear(fin, fout, device=device)
        with torch.no_grad():
            dense.weight.copy_(layer.weight())
            dense.bias.copy_(layer.bias)
        results[label] = {}
        for batch in batches:
            t = results[label][batch] = timings(layer, dense, batch, device, min_run_time)
            for mode in ("inference", "forward+backward"):
                target = TARGETS.get((index, mode, batch))
                speedup = t[(mode, "dense")] / t[(mode, "auto")]
                rows.append([label, mode, batch, t[(mode, "dense")], t[(mode, "unfused")], t[(mode, "expand")],
                             t[(mode, "compressed")], t[(mode, "auto")], t[(mode, "lut8")],
                             t["choice"][mode != "inference"], speedup,
                             t[(mode + " cpu", "dense")] / t[(mode + " cpu", "auto")],
                             t[(mode, "auto")] / min(t[(mode, "expand")], t[(mode, "compressed")]),
                             t[(mode, "auto")] / t[(mode, "unfused")], t[(mode, "dense")] / t[(mode, "lut8")],
                             t["load"],
                             "" if target is None else f">= {target:g}x: {'met' if speedup >= target else 'MISSED'}"])
                print(rows[-1], flush=True)
    headers = ["layer", "mode", "batch", "dense ms", "unfused ms", "expand ms", "compressed ms", "auto ms",
               "lut8 ms (opt-in)", "auto chose", "dense / auto", "dense / auto, CPU time", "auto / best path",
               "auto / unfused", "dense / lut8", "load (1 min)", "target"]
    body = ("Latency per call (median). `unfused`: `F.linear(x, rpq_fx::expand(...), b)` under autograd, as "
            "before this op; `expand`: `rpq_fx::linear` forced to expand (the weight rebuilt in backward, never "
            "kept); `compressed`: forced to the compressed domain (the weight never built); `auto`: what "
            "`RPQLinear` and converted models do (the path it chose is given). `dense / auto` above 1 means "
            "faster than `nn.Linear`; `auto / best path` near 1 means the per-call choice picked well; "
            "`auto / unfused` at or below 1 means never slower than expand-then-matmul; `dense / auto, CPU time`: the "
            "same ratio in process CPU time (less disturbed by other work on the machine); `load`: the 1-minute load "
            "average when the row was timed. Batches of one or two rows compute through 32-bit lookup tables "
            "(as close as float32) where the CPU has AVX-512 VBMI; `lut8` is the opt-in 8-bit one.\n\n"
            + table(rows, headers) + f"\n\n![latency vs batch](linear_{device.type}.png)\n")
    write(f"linear_{device.type}", f"RPQ linear vs dense nn.Linear ({device.type}, fp32)", body, started)
    plot(results, batches, RESULTS / f"linear_{device.type}.png")


if __name__ == "__main__":
    main()
