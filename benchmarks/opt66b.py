"""OPT-66b as RPQ, materialised on this machine: a forward pass, its peak memory and time per token.

The model is built on the meta device from a hand-written ``OPTConfig`` (hidden 9216, 64 layers,
72 heads, ffn 36864, vocab 50272; nothing dense is allocated), converted with 72 codebooks
(``rpq_fx.convert`` keeps the Hugging Face model object and rewrites each layer), then given CPU
storage and a random RPQ init (random codes, codebooks drawn like the dense init; LayerNorms at
1/0, biases 0) and run: a prefill of the prompt, then greedy decoding with the KV cache, timed per
token. Every linear layer is one ``rpq_fx::linear`` (at batch 1 the compressed-domain path: the
264 GB of dense weights never exist, not even one layer at a time).

Writes ``benchmarks/results/opt66b.md``.

    python benchmarks/opt66b.py [--prompt 8] [--new-tokens 8]
"""

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, table, write  # noqa: E402
from static_sizes import materialise, opt_66b  # noqa: E402

import rpq_fx  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = rss_mib(), threading.Event()

    def run(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_mib())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    started = load()
    watch = PeakRSS()
    watch.start()
    t0 = time.perf_counter()
    model = rpq_fx.convert(opt_66b(), num_codebooks=72)
    t1 = time.perf_counter()
    before = rss_mib()
    materialise(model)
    model.eval()
    t2 = time.perf_counter()
    held = rss_mib() - before
    size = rpq_fx.model_size(model)
    fused = sum(1 for m in model.modules() if isinstance(m, torch.fx.GraphModule)
                for n in m.graph.nodes if n.target is torch.ops.rpq_fx.linear.default)
    expands = sum(1 for m in model.modules() if isinstance(m, torch.fx.GraphModule)
                  for n in m.graph.nodes if n.target is torch.ops.rpq_fx.expand.default)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50272, (1, args.prompt))
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        assert torch.isfinite(out.logits).all()
        for _ in range(args.new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - start)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        assert torch.isfinite(out.logits).all()
    watch.done.set()
    watch.join()
    steps.sort()
    rows = [["convert on meta", f"{t1 - t0:.1f} s"], ["materialise + random RPQ init", f"{t2 - t1:.1f} s"],
            ["model_size", f"{size:.1f} MiB"], ["resident-set growth when materialised", f"{held:.1f} MiB"],
            ["fused rpq_fx::linear nodes / expansions left", f"{fused} / {expands}"],
            [f"prefill, {args.prompt} tokens", f"{prefill:.2f} s ({prefill / args.prompt:.2f} s per token)"],
            [f"decode, median of {len(steps)} tokens (KV cache)", f"{steps[len(steps) // 2]:.2f} s per token"],
            ["decode, fastest / slowest token", f"{steps[0]:.2f} / {steps[-1]:.2f} s"],
            ["peak resident set of the process", f"{watch.peak / 1024:.2f} GiB"]]
    body = ("OPT-66b (fp32, 65.7 B parameters, 264 GB dense) as RPQ with 72 codebooks, on the CPU of this "
            "machine.\n\n" + table(rows, ["", ""]) + "\n")
    write("opt66b", "OPT-66b as RPQ: materialised and run on a 2-core, 24 GB machine", body, started)


if __name__ == "__main__":
    main()
