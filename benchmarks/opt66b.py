"""OPT-66b as RPQ, materialised on this machine: a forward pass, its peak memory and time per token.

The model is built on the meta device from a hand-written ``OPTConfig`` (hidden 9216, 64 layers,
72 heads, ffn 36864, vocab 50272; nothing dense is allocated), converted with 72 codebooks
(``rpq_fx.convert`` keeps the Hugging Face model object and rewrites each layer), then given CPU
storage and a random RPQ init (random codes, codebooks drawn like the dense init; LayerNorms at
1/0, biases 0) and run: a prefill of the prompt, then greedy decoding with the KV cache, timed per
token. Every linear layer is one ``rpq_fx::linear`` (at batch 1 the compressed-domain path: the
264 GB of dense weights never exist, not even one layer at a time).

Decode is bound by memory bandwidth: each token reads every codebook and code of every layer once
(codebooks + codes of each ``rpq_fx::linear``, the dense norms and biases, the KV cache; an embedding lookup
only its rows). The run also measures this machine's bandwidth, a STREAM-like copy (``dst.copy_(src)`` of
two buffers far larger than the caches, counted as bytes read + written; best of the repeats, as STREAM
reports) and a read-only sum, and reports decode time over ``bytes per token / bandwidth`` (issue 23's
target: within 1.3x). The bandwidth this machine gets varies over minutes (34-76 GB/s read on one day, with other
work on it or, it seems, on its host), so the run also decodes once more with a read-only sum after each token and reports each
token against the bandwidth measured just after it.

Decode runs twice, with transformers' ``DynamicCache`` (keys and values concatenated onto the cache every token)
and with its ``StaticCache`` (preallocated for the whole generation, written in place); the faster is the decode
measured against the limit (a dense model would use the same cache), and both rows are reported. Unless
``OMP_WAIT_POLICY`` is set, the run is repeated in a child process with ``OMP_WAIT_POLICY=PASSIVE`` (libgomp, torch's
OpenMP, reads it only when it loads, so no call made at run time can set it): its rows say what a user who sets
it gets.

``--quick`` (``--layers 8 --prompt 4 --new-tokens 4``): the first 8 of the 64 decoder layers, everything
else as in the full model (the same layers, embedding and head), so the ratio is measured honestly on fewer
layers; a minute or two and ~1.3 GB.

Writes ``benchmarks/results/opt66b.md`` (``opt66b_quick.md`` with ``--quick`` or ``--layers``), keeping the
hand-written ``## Notes`` section of the file it replaces.

    python benchmarks/opt66b.py [--prompt 8] [--new-tokens 8] [--layers 64] [--quick] [--stream-mib 1024] [--no-child]
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, kept_notes, load, table, write  # noqa: E402
from static_sizes import materialise, opt_66b  # noqa: E402

import rpq_fx  # noqa: E402
from rpq_fx.nn import RPQLinear  # noqa: E402

LAYERS = 64


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


def read_probe(mib: int):
    """A call that returns the read-only bandwidth (bytes per second) of one ``sum`` of a float32 buffer of ``mib``
    MiB, with torch's threads (the buffer's pages touched once here)."""
    src = torch.ones(mib * 2**20 // 4)

    def probe() -> float:
        start = time.perf_counter()
        src.sum()
        return src.nbytes / (time.perf_counter() - start)
    return probe


def bandwidth(mib: int, repeats: int = 5) -> tuple[float, float]:
    """``(copy, read)`` bytes per second, best of ``repeats``: ``dst.copy_(src)`` counted as bytes read + written
    (STREAM's copy), and ``src.sum()`` (reads only), on float32 buffers of ``mib`` MiB with torch's threads."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.zeros_like(src)  # every page touched before timing
    copy = read = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - start)
        start = time.perf_counter()
        src.sum()
        read = min(read, time.perf_counter() - start)
    return 2 * src.nbytes / copy, src.nbytes / read


def weight_bytes_per_token(model: torch.nn.Module, lookups: set[str]) -> int:
    """Bytes of the model's tensors one decode token must read: every parameter and buffer, except an RPQ
    weight read only by embedding lookups (every alias in ``lookups``): of those, one row (C codes and C
    codewords)."""
    total = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    for layer in rpq_fx.conversion_record(model).layers:
        if layer.converted and set(layer.aliases) <= lookups:
            weight = model.get_submodule(layer.aliases[0])
            total -= weight.codebooks.nbytes + weight.codes.nbytes
            total += weight.codes.shape[0] * (weight.codes.element_size()
                                              + weight.codebooks.shape[2] * weight.codebooks.element_size())
    return total


def op_breakdown(step, top: int = 6) -> str:
    """Where one decode token's time goes: ``torch.profiler``'s self time per op (wall time on the calling thread,
    ms), the largest first, and the rest together."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    times = sorted(((e.self_cpu_time_total / 1e3, e.key) for e in prof.key_averages()), reverse=True)
    shown = ", ".join(f"{name} {ms:.1f}" for ms, name in times[:top])
    return f"{shown}, other ops {sum(ms for ms, _ in times[top:]):.1f} (ms)"


CACHES = ("dynamic", "static")


def decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache: str, probe=None):
    """A prefill of ``prompt``, then greedy decoding of ``new_tokens`` one call per token with a ``cache`` KV cache
    (``"dynamic"``: transformers' default ``DynamicCache``; ``"static"``: a ``StaticCache`` sized for the whole run
    and one more token). Returns the prefill's seconds, each token's wall and process-CPU seconds (sorted), a call that
    decodes one more token (for the profiler) and, with ``probe``, (token seconds, the probe's bandwidth just after
    it) per token in order."""
    past = (StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens + 1) if cache == "static"
            else None)
    steps, step_cpu, probed = [], [], []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, cache=past, use_cache=True)
        prefill = time.perf_counter() - start
        past, token = out.cache, out.logits[:, -1:].argmax(-1)
        assert torch.isfinite(out.logits).all()
        for _ in range(new_tokens):
            start, cpu = time.perf_counter(), time.process_time()
            out = model(input_ids=token, cache=past, use_cache=True)
            steps.append(time.perf_counter() - start)
            step_cpu.append(time.process_time() - cpu)
            if probe is not None:
                probed.append((steps[-1], probe()))
            past, token = out.cache, out.logits[:, -1:].argmax(-1)
        assert torch.isfinite(out.logits).all()

    def one_more():
        with torch.inference_mode():
            model(input_ids=token, cache=past, use_cache=True)

    return prefill, sorted(steps), sorted(step_cpu), one_more, probed


def build(layers: int) -> tuple[torch.nn.Module, set[str], float, float, float]:
    """OPT-66b (its first ``layers`` decoder layers) converted on meta, then materialised: the model, the names of
    its embedding weights, convert and materialise seconds, and the resident-set growth (MiB)."""
    t0 = time.perf_counter()
    dense = opt_66b()
    if layers < LAYERS:  # reason: on the meta device, nothing to free; the config sizes the KV cache
        dense.model.decoder.layers = dense.model.decoder.layers[:layers]
        dense.config.num_hidden_layers = layers
    lookups = {f"{name}.weight" for name, m in dense.named_modules() if isinstance(m, torch.nn.Embedding)}
    model = rpq_fx.convert(dense, num_codebooks=72, progress=False)
    t1 = time.perf_counter()
    before = rss_mib()
    materialise(model)
    model.eval()
    return model, lookups, t1 - t0, time.perf_counter() - t1, rss_mib() - before


def decode_rows(model: torch.nn.Module, args) -> dict[str, dict]:
    """Per cache: prefill seconds, median / fastest / slowest token, median process CPU time per token."""
    torch.manual_seed(0)
    prompt = torch.randint(0, 50272, (1, args.prompt))
    rows = {}
    for cache in CACHES:
        prefill, steps, cpu, *_ = decode(model, prompt, args.new_tokens, cache)
        rows[cache] = {"prefill": prefill, "median": steps[len(steps) // 2], "fastest": steps[0], "slowest": steps[-1],
                       "cpu": cpu[len(cpu) // 2]}
    return rows


def child(args) -> dict[str, dict]:
    """:func:`decode_rows` in a child process with ``OMP_WAIT_POLICY=PASSIVE`` (the model built there again)."""
    command = [sys.executable, __file__, "--child", "--layers", str(args.layers), "--prompt", str(args.prompt),
               "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers kept, the first ones (of 64)")
    parser.add_argument("--quick", action="store_true", help="--layers 8 --prompt 4 --new-tokens 4")
    parser.add_argument("--stream-mib", type=int, default=1024, help="size of each bandwidth buffer (MiB)")
    parser.add_argument("--no-child", action="store_true", help="no OMP_WAIT_POLICY=PASSIVE rows (no child process)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the child: decode rows as JSON
    args = parser.parse_args()
    if args.quick:
        args.layers, args.prompt, args.new_tokens = 8, 4, 4
    if not 1 <= args.layers <= LAYERS:
        parser.error(f"--layers must be in 1..{LAYERS}, got {args.layers}")
    if args.child:
        print(json.dumps(decode_rows(build(args.layers)[0], args)))
        return
    policy = os.environ.get("OMP_WAIT_POLICY")
    started = load()
    cpu0 = time.process_time()
    stream_before = bandwidth(args.stream_mib)
    watch = PeakRSS()
    watch.start()
    model, lookups, convert_s, materialise_s, held = build(args.layers)
    size = rpq_fx.model_size(model)
    # reason: transformers models are converted layer by layer: an nn.Linear becomes an RPQLinear (its forward is
    # one rpq_fx::linear), other layers a GraphModule
    graphs = [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]
    fused = sum(isinstance(m, RPQLinear) for m in model.modules()) + sum(
        1 for m in graphs for n in m.graph.nodes if n.target is torch.ops.rpq_fx.linear.default)
    expands = sum(1 for m in graphs for n in m.graph.nodes if n.target is torch.ops.rpq_fx.expand.default)
    lookup_weights = sum(1 for m in graphs for n in m.graph.nodes if getattr(n.target, "__name__", "") == "lookup_weight")
    decoded = decode_rows(model, args)
    best = min(CACHES, key=lambda c: decoded[c]["median"])
    torch.manual_seed(0)
    prompt = torch.randint(0, 50272, (1, args.prompt))
    *_, one_more, _ = decode(model, prompt, args.new_tokens, best)
    cpu_token = time.process_time()
    breakdown = op_breakdown(one_more)
    cpu_token = time.process_time() - cpu_token
    watch.done.set()
    watch.join()
    # reason: after the resident-set watch: the probe's buffer is the benchmark's, not the model's
    *_, probed = decode(model, prompt, args.new_tokens, best, read_probe(args.stream_mib))
    decode_cpu = time.process_time() - cpu0
    config = model.config
    weights = weight_bytes_per_token(model, lookups)
    del model, one_more
    gc.collect()  # reason: the child builds the model again; this one's 5.6 GB must be gone first
    passive = None if policy is not None or args.no_child else child(args)
    stream_after = bandwidth(args.stream_mib)
    copy_bw, read_bw = (max(a, b) for a, b in zip(stream_before, stream_after))
    # the KV cache a decode step reads: keys and values of every layer, prompt and tokens so far (mean over steps)
    seq = args.prompt + (args.new_tokens + 1) / 2
    kv = 2 * args.layers * seq * config.hidden_size * 4
    per_token = weights + kv
    limit_copy, limit_read = per_token / copy_bw, per_token / read_bw
    threads = torch.get_num_threads()

    def decode_table(rows: dict[str, dict], label: str) -> list[list[str]]:
        return [[f"decode, {cache} cache{label}: median / fastest / slowest token, median CPU per token",
                 f"{r['median']:.3f} / {r['fastest']:.3f} / {r['slowest']:.3f} s, CPU {r['cpu']:.3f} s; "
                 f"median / read limit {r['median'] / limit_read:.2f}x (prefill {r['prefill']:.2f} s)"]
                for cache, r in rows.items()]

    median = decoded[best]["median"]
    rows_decode = decode_table(decoded, f" (OMP_WAIT_POLICY {policy or 'unset'})")
    if passive is not None:
        rows_decode += decode_table(passive, " (child process, OMP_WAIT_POLICY=PASSIVE)")
    rows_bw = [
        ["bytes one decode token reads", f"{per_token / 2**20:.1f} MiB (weights, norms, biases "
                                         f"{weights / 2**20:.1f} MiB; KV cache {kv / 2**20:.1f} MiB)"],
        ["STREAM-like copy, before / after the model ran", f"{stream_before[0] / 1e9:.2f} / "
                                                           f"{stream_after[0] / 1e9:.2f} GB/s (read + written)"],
        ["read-only sum, before / after", f"{stream_before[1] / 1e9:.2f} / {stream_after[1] / 1e9:.2f} GB/s"],
        ["bandwidth limit per token: bytes / best copy, / best read",
         f"{limit_copy:.3f} s, {limit_read:.3f} s"],
        [f"decode ({best} cache, the faster) median / that limit (target <= 1.3)",
         f"{median / limit_copy:.2f}x (copy), {median / limit_read:.2f}x (read)"],
        ["decode fastest / that limit", f"{decoded[best]['fastest'] / limit_copy:.2f}x (copy), "
                                        f"{decoded[best]['fastest'] / limit_read:.2f}x (read)"],
        [f"decode ({best} cache) again, a read-only sum of {args.stream_mib} MiB after each token: median of token / "
         "(bytes / the bandwidth of the sum after it); that bandwidth, lowest-highest",
         f"{statistics.median(step * bw / per_token for step, bw in probed):.2f}x "
         f"({min(bw for _, bw in probed) / 1e9:.1f}-{max(bw for _, bw in probed) / 1e9:.1f} GB/s; tokens "
         f"{statistics.median(step for step, _ in probed):.3f} s median)"],
        ["decode median CPU time / threads / that limit (what a quiet machine would show, roughly)",
         f"{decoded[best]['cpu'] / threads / limit_copy:.2f}x (copy)"],
        [f"one more decode token ({best} cache) by op (torch.profiler self time, calling thread; "
         f"process CPU {cpu_token:.2f} s)", breakdown],
        ["process CPU time (bandwidth, build, run; the child's not counted)", f"{decode_cpu:.1f} s"]]
    rows = [["convert on meta", f"{convert_s:.1f} s"], ["materialise + random RPQ init", f"{materialise_s:.1f} s"],
            ["model_size", f"{size:.1f} MiB"], ["resident-set growth when materialised", f"{held:.1f} MiB"],
            ["rpq_fx::linear layers / expansions left / lookup weights (embedding subclasses)",
             f"{fused} / {expands} / {lookup_weights}"],
            [f"prefill, {args.prompt} tokens ({best} cache)",
             f"{decoded[best]['prefill']:.2f} s ({decoded[best]['prefill'] / args.prompt:.2f} s per token)"],
            *rows_decode,
            ["peak resident set of the process", f"{watch.peak / 1024:.2f} GiB"], *rows_bw]
    whole = args.layers == LAYERS
    what = ("OPT-66b (fp32, 65.7 B parameters, 264 GB dense)" if whole else
            f"OPT-66b's first {args.layers} of 64 decoder layers, its embedding and head")
    body = (f"{what} as RPQ with 72 codebooks, on the CPU of this machine ({threads} threads, "
            f"{os.cpu_count()} cores; OMP_WAIT_POLICY {policy or 'unset'}), {args.prompt} prompt tokens, "
            f"{args.new_tokens} decoded.\n\n" + table(rows, ["", ""]) + "\n")
    name = "opt66b" if whole else "opt66b_quick"
    notes = kept_notes(RESULTS / f"{name}.md")
    write(name, "OPT-66b as RPQ: materialised and run on a 2-core, 24 GB machine" if whole else
          f"OPT-66b as RPQ, {args.layers} of 64 layers: decode against the memory-bandwidth limit",
          body + ("\n" + notes if notes else ""), started)


if __name__ == "__main__":
    main()
