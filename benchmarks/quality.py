"""Quality: how well each way of compressing real pretrained weights keeps what the model computes.

Three tasks (``benchmarks/_quality/tasks.py``): all-MiniLM-L6-v2 sentence embeddings of Shakespeare
lines, EfficientNet-Lite0 (ImageNet) on natural-image crops, and a small CNN trained here on the
8x8 digits. Methods, each at several sizes (stored bits per weight): RPQ with random codebooks (a
floor), k-means codebooks, data-aware k-means (``calibration=``), data-aware plus distillation
fine-tuning (``rpq_fx.finetune``), and round-to-nearest per-row symmetric int8 / int4 / int2 on the
same weights. RPQ sizes are shared codebooks (one ``[1, K, d]`` table per weight, K = 256) with
``codebook_dim`` d = 1, 2, 4, 8 (codes are one byte each: about 8, 4, 2, 1 bits per weight), and
scalar weight sharing d = 1, K = 16 (4 bits of index, stored as one byte: 8 bits per weight).
Calibration and fine-tuning data are never the evaluation data.

Writes ``quality.md``, ``quality.json`` and ``quality.png`` to ``benchmarks/results/`` (or ``--out``).

    python benchmarks/quality.py [--quick] [--tasks minilm efficientnet digits] [--sizes 1 2 4 8 1x16]
                                 [--methods ...] [--finetune-steps 30] [--out DIR]
"""

import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, load, machine, table, write  # noqa: E402
from _quality import output  # noqa: E402
from _quality.methods import RPQ_METHODS, VALIDATE_EVERY, Size, run_dense, run_rpq, run_rtn  # noqa: E402
from _quality.tasks import BUILDERS, SELECTION  # noqa: E402

SIZES = [Size(1), Size(2), Size(4), Size(8), Size(1, num_codes=16)]
RTN_BITS = [8, 4, 2]
FINETUNE_STEPS = 30
QUICK = dict(sizes=[Size(4)], rtn_bits=[4], finetune_steps=2, max_weights=2,
             tasks={"minilm": dict(n_eval=64, n_calib=32), "efficientnet": dict(n_eval=16, n_calib=16),
                    "digits": dict(epochs=3, n_calib=64)})


def _size(text: str) -> Size:
    d, _, k = text.partition("x")
    return Size(int(d), int(k) if k else 256)


def run_task(name: str, build_kwargs: dict, sizes: list[Size], rtn_bits: list[int], methods: list[str],
             finetune_steps: int, max_weights: int | None = None) -> tuple[dict, list[str]]:
    """Every method at every size on one task: its rows (for the files) and its failures.
    ``max_weights`` keeps only that many of the selected weights (the smallest: fast fits, for --quick)."""
    start = time.perf_counter()
    task = BUILDERS[name](**build_kwargs)
    if max_weights is not None:
        task.weights = dict(sorted(task.weights.items(), key=lambda kv: kv[1].numel())[:max_weights])
    numel = sum(p.numel() for p in task.weights.values())
    total = sum(p.numel() for p in task.model.parameters())
    print(f"== {name}: built in {time.perf_counter() - start:.0f} s; {len(task.weights)} weights "
          f"({numel} of {total} parameters) quantised", flush=True)
    rows, failures = [run_dense(task)], []

    def record(label: str, row: dict) -> None:
        rows.append(row)
        print(f"  {label}: {row['bits_per_weight']:.3f} bits/weight, model {row['model_ratio']:.2f}x, "
              + ", ".join(f"{k} {row[k]:.4f}" for k in task.metrics) + f" ({row['seconds']:.1f} s)", flush=True)

    def attempt(label: str, job) -> None:
        try:
            job()
        except Exception as error:  # record it, run the rest, fail at the end
            traceback.print_exc()
            failures.append(f"{name}: {label}: {type(error).__name__}: {error}")

    for bits in rtn_bits:
        attempt(f"RTN int{bits}", lambda b=bits: record(f"RTN int{b}", run_rtn(task, b)))
    for size in sizes:
        def job(size=size):
            for method, row in run_rpq(task, methods, size, finetune_steps):
                record(f"{method}, {size.label}", row)
        attempt(f"RPQ {size.label}", job)
    coverage = (f"Quantised, by every method: {len(task.weights)} weights, {numel:,} of the model's {total:,} "
                f"parameters ({100 * numel / total:.1f}%); bits per weight are counted over these alone, the model "
                f"ratio over every parameter and buffer (the rest stays fp32)."
                + (f" (--quick: only the {max_weights} smallest selected weights.)" if max_weights else ""))
    result = {"name": name, "title": task.title, "notes": task.notes, "coverage": coverage, "metrics": task.metrics,
              "weights": {k: list(p.shape) for k, p in task.weights.items()}, "rows": rows,
              "failures": failures, "seconds": time.perf_counter() - start}
    return result, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny data, one size, the two smallest selected weights per task")
    parser.add_argument("--tasks", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--methods", nargs="+", choices=list(RPQ_METHODS), default=list(RPQ_METHODS))
    parser.add_argument("--sizes", nargs="+", type=_size, metavar="D[xK]",
                        help="RPQ sizes as codebook_dim[xnum_codes], e.g. 1 2 4 8 1x16 (the default)")
    parser.add_argument("--finetune-steps", type=int, default=None, help=f"default {FINETUNE_STEPS}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for quality.md / .json / .png")
    args = parser.parse_args()
    sizes, rtn_bits = (QUICK["sizes"], QUICK["rtn_bits"]) if args.quick else (SIZES, RTN_BITS)
    sizes = args.sizes or sizes
    steps = args.finetune_steps or (QUICK["finetune_steps"] if args.quick else FINETUNE_STEPS)
    started, start = load(), time.perf_counter()
    torch.manual_seed(0)
    tasks, failures = [], []
    for name in args.tasks:
        result, failed = run_task(name, QUICK["tasks"][name] if args.quick else {}, sizes, rtn_bits, args.methods,
                                  steps, QUICK["max_weights"] if args.quick else None)
        tasks.append(result)
        failures += failed
    wall = time.perf_counter() - start
    meta = {"command": command(), "machine": machine(), "torch": torch.__version__, "wall_s": wall,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "sizes": [s.label for s in sizes], "rtn_bits": rtn_bits, "finetune_steps": steps, "selection": SELECTION}
    args.out.mkdir(parents=True, exist_ok=True)
    output.write_json(args.out / "quality.json", meta, tasks)
    output.plot(args.out / "quality.png", tasks)
    body = (f"Wall time {wall:.0f} s ({wall / 60:.1f} min){', --quick' if args.quick else ''}. Raw numbers: "
            f"`quality.json`; plot: `quality.png`.\n\n"
            f"**Weights quantised** (the same for every method and size): {SELECTION}.\n\n"
            "**Bits per weight** are what is stored, over those weights: RPQ codes (one byte each, K <= 256) plus "
            "the fp32 codebooks (one shared `[1, K, d]` table per weight); RTN `bits` plus one fp32 scale per row. "
            "`index bits` is the information in the codes, log2(K) / d (RTN: its integer width). `model ratio` is "
            "the dense model's bytes over the compressed model's, every parameter and buffer counted (RTN is "
            "fake-quantised here: its size is what it would store). Agreement metrics compare with the dense "
            f"model's own outputs. Fine-tuning: `rpq_fx.finetune`, {steps} steps on the first three quarters of "
            f"the calibration inputs, dense teacher, starting from the data-aware conversion; the last quarter is "
            f"its validation (loss measured every {VALIDATE_EVERY} steps, the best state kept). `time s`: conversion + fine-tuning + evaluation "
            "(a fine-tuned row counts the data-aware conversion it starts from).\n\n"
            + "\n".join(output.task_table(t, table) for t in tasks)
            + ("\n**Failures**\n\n" + "\n".join(f"- {f}" for f in failures) + "\n" if failures else ""))
    write("quality", "Quality of compressed pretrained weights: RPQ (k-means, data-aware, fine-tuned) vs RTN",
          body, started, directory=args.out)
    if failures:
        raise SystemExit(f"{len(failures)} runs failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
