"""The data-aware fit on a whole real model: all-MiniLM-L6-v2, time, throughput and quality (issue 23 section 3).

    python benchmarks/fit_minilm.py [--cases convert allocate] [--out benchmarks/results] [--threads N]
                                     [--whole-model]

``convert``: ``rpq_fx.convert(model, codebook_dim=4, shared_codebooks=True, init="kmeans",
calibration=<256 lines>)`` over the quality benchmark's weights (``benchmarks/_quality``: the same
task, lines and evaluation as ``quality.py`` and ``minilm_low_bits.py``). ``allocate``:
``rpq_fx.allocate(model, 2.0, <256 lines>)`` with ``minilm_low_bits.py``'s candidate sizes and base
config, the costs measured on the calibration lines. Each row gives wall seconds and the process's
CPU seconds (``time.process_time``: on a machine shared with other work the wall time inflates,
the CPU time much less), the load average around it, the parameters fitted per wall second (for
``allocate``: the model's converted parameters over the whole call, which fits each once per
size), the hours 7e9 parameters would take at that rate, and the mean cosine / top-10 neighbour
agreement with the dense embeddings on 2000 held-out lines. ``--whole-model``: the reference path
(the whole model run for every group of layers and every cost), for a same-machine comparison.
Writes ``results/fit_minilm.md``, keeping its hand-written ``## Notes`` section.
"""

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, kept_notes, load, table, timed, write  # noqa: E402
from _quality import methods, tasks  # noqa: E402

import rpq_fx  # noqa: E402
import torch  # noqa: E402
from rpq_fx.fit import sequential  # noqa: E402

allocate_module = importlib.import_module("rpq_fx.allocate")  # reason: rpq_fx.allocate is also the function

BASE = {"codebook_dim": 4, "shared_codebooks": True, "init": "kmeans", "codebook_dtype": "float16"}  # allocate's
SEVEN_B = 7e9
SIZES = [{"codebook_dim": d} for d in (8, 6, 4, 3, 2)] + [{"codebook_dim": 8, "hot_rows": 6144, "hot_codebook_dim": 4}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["convert", "allocate"], choices=["convert", "allocate"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--whole-model", action="store_true",
                        help="run the whole model for every group of layers and every cost, as before the "
                             "block-by-block fit (the reference to compare with)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.whole_model:  # reason: block_split finding no blocks is the whole-model path (convert and allocate)
        sequential.block_split = allocate_module.block_split = lambda *args, **kwargs: None
    label = " (whole model per group)" if args.whole_model else ""
    notes = kept_notes(args.out / "fit_minilm.md")
    started = load()
    task = tasks.build_minilm()
    chosen = methods.weight_filter(task.weights)
    params = sum(p.numel() for p in task.weights.values())
    rows = []
    if "convert" in args.cases:
        model, wall, cpu, before, after = timed(lambda: rpq_fx.convert(
            task.model, codebook_dim=4, shared_codebooks=True, init="kmeans", calibration=task.calibration,
            filter_fn=chosen, progress=False).eval())
        quality = task.evaluate(model)
        rows.append([f"convert, d=4 shared, data-aware, 256 lines{label}", wall, cpu, params / wall / 1e6,
                     SEVEN_B / params * wall / 3600,
                     rpq_fx.report(model).totals["bits_per_weight"], quality["cosine"], quality["nn_agreement"],
                     f"{before:.1f} / {after:.1f}"])
        print(rows[-1], flush=True)
    if "allocate" in args.cases:
        config, wall, cpu, before, after = timed(lambda: rpq_fx.allocate(
            task.model, 2.0, task.calibration, sizes=SIZES, config=rpq_fx.RPQConfig.from_dict(BASE),
            filter_fn=chosen, progress=False))
        model = rpq_fx.convert(task.model, config=config, calibration=task.calibration, filter_fn=chosen,
                               progress=False).eval()
        quality = task.evaluate(model)
        rows.append([f"allocate for 2.0 bits, {len(SIZES)} sizes, 256 lines (then convert){label}", wall, cpu,
                     params * len(SIZES) / wall / 1e6, SEVEN_B / params * wall / 3600,
                     rpq_fx.report(model).totals["bits_per_weight"],
                     quality["cosine"], quality["nn_agreement"], f"{before:.1f} / {after:.1f}"])
        print(rows[-1], flush=True)
    body = (f"all-MiniLM-L6-v2, the quality benchmark's {len(task.weights)} weights ({params / 1e6:.1f} M parameters), "
            "calibrated on its 256 Shakespeare lines (batches of 32), evaluated on its 2000 held-out lines against "
            "the dense embeddings. M params / s: parameters fitted per wall second (allocate fits each once per "
            f"size: {len(SIZES)} sizes, {SIZES}, base {BASE}). 7B h: hours for 7e9 parameters at the same "
            "parameters per second (the fit's time grows about linearly with the parameters at a given layer width; "
            "wider layers cost more per parameter). Targets (issue 23 section 3): convert < 30 s, allocate < 5 min."
            "\n\n"
            + table(rows, ["case", "wall s", "CPU s", "M params / s", "7B h", "bits / weight", "mean cosine",
                           "top-10 NN", "load before / after (1 min)"], floatfmt=".3f"))
    path = write("fit_minilm", "The data-aware fit of all-MiniLM-L6-v2: time and quality", body, started,
                 directory=args.out)
    if notes:
        path.write_text(path.read_text() + "\n" + notes)


if __name__ == "__main__":
    main()
