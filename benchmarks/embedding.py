"""Embedding lookups: ``RPQEmbedding`` expands only the rows it looks up.

Against ``nn.Embedding`` holding the same (expanded) table, and against expanding the whole table
then looking up (what a lookup through ``rpq_fx::expand`` would cost), for a few token counts:
forward alone (inference) and forward+backward. Medians of ``torch.utils.benchmark``, one process.

Writes ``benchmarks/results/embedding_<device>.md``.

    python benchmarks/embedding.py [--quick] [--min-run-time 0.2]
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, median_ms, table, write  # noqa: E402

from rpq_fx.nn import RPQEmbedding  # noqa: E402

TABLES = [("GPT-2 wte", 50257, 768, 12), ("OPT-6.7b-wide", 50272, 4096, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    min_run_time = 0.05 if args.quick else args.min_run_time
    started = load()
    torch.manual_seed(0)
    rows = []
    for label, num, dim, c in TABLES:
        rpq = RPQEmbedding(num, dim, c)
        dense = nn.Embedding(num, dim)
        with torch.no_grad():
            dense.weight.copy_(rpq.weight())
        for tokens in ([1, 8, 512] if args.quick else [1, 8, 64, 512, 4096]):
            idx = torch.randint(0, num, (1, tokens))
            grad = torch.randn(1, tokens, dim)
            params = [rpq.weight.codebooks, dense.weight]

            def step(fn):
                def run():
                    for p in params:
                        p.grad = None
                    fn().backward(grad)
                return run

            calls = {"dense": lambda: dense(idx), "rpq": lambda: rpq(idx),
                     "expand all": lambda: F.embedding(idx, rpq.weight())}
            t = {}
            for name, fn in calls.items():
                with torch.inference_mode():
                    t["inf", name] = median_ms(fn, min_run_time)
                t["fb", name] = median_ms(step(fn), min_run_time)
            rows.append([label, f"{num}x{dim}", c, tokens, t["inf", "dense"], t["inf", "rpq"], t["inf", "expand all"],
                         t["inf", "rpq"] / t["inf", "dense"], t["fb", "dense"], t["fb", "rpq"], t["fb", "expand all"],
                         t["fb", "rpq"] / t["fb", "dense"]])
            print(rows[-1], flush=True)
    headers = ["table", "shape", "C", "tokens", "dense ms", "RPQ ms", "expand-all ms", "RPQ / dense",
               "dense fwd+bwd ms", "RPQ fwd+bwd ms", "expand-all fwd+bwd ms", "RPQ / dense (fwd+bwd)"]
    body = ("`RPQ`: `RPQEmbedding` (`rpq_fx::embedding`, only the looked-up rows expanded); `expand-all`: the "
            "whole table expanded, then `F.embedding`. Dense fwd+bwd builds a dense table-sized gradient; RPQ "
            "scatters into the codebooks.\n\n" + table(rows, headers, floatfmt=".3f"))
    write("embedding_cpu", "Embedding lookups: RPQEmbedding vs nn.Embedding (cpu, fp32)", body, started)


if __name__ == "__main__":
    main()
