"""Model level: timm ViT-B/16 (224) dense against RPQ (``num_codebooks = heads = 12``).

Inference latency (batch 1 and 8) and one AdamW training step (batch 4), for: dense, RPQ, RPQ with
``checkpoint=True``, and each of those under ``torch.compile`` (inductor). Each configuration runs
in a fresh subprocess, so that its memory is its own. Memory is given two ways: exactly, as the
bytes of the model (``model_size``), of the tensors autograd saves for backward (parameters not
counted), of the gradients and of the AdamW state; and as measured, the peak resident set of the
process during the timed calls (sampled every millisecond; it includes the ~0.3 GiB that importing
torch and timm costs every process).

In the converted model every linear layer is one ``rpq_fx::linear`` node (compressed domain or
expand, chosen per call); the patch-embedding convolution keeps an expansion, which is what
``checkpoint=True`` wraps.

Writes ``benchmarks/results/vit_b16.md``.

    python benchmarks/vit_b16.py [--no-compile] [--min-run-time 1.0]
"""

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, median_ms, table, write  # noqa: E402

CONFIGS = [  # name, rpq, checkpoint, compile
    ("dense", False, False, False),
    ("RPQ", True, False, False),
    ("RPQ, checkpoint=True", True, True, False),
    ("dense, compiled", False, False, True),
    ("RPQ, compiled", True, False, True),
    ("RPQ, checkpoint=True, compiled", True, True, True),
]
TASKS = [("inference", 1), ("inference", 8), ("train step (AdamW)", 4)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class _PeakRSS:
    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_one(config: str, task: str, batch: int, min_run_time: float) -> dict:
    import timm

    import rpq_fx

    _, rpq, checkpoint, compiled = next(c for c in CONFIGS if c[0] == config)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    if rpq:
        model = rpq_fx.convert(model, num_codebooks=12, checkpoint=checkpoint, inplace=True)
    training = task.startswith("train")
    model.train(training)
    size = rpq_fx.model_size(model)
    x = torch.randn(batch, 3, 224, 224)
    target = torch.randint(0, 1000, (batch,))
    net = torch.compile(model) if compiled else model
    if training:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), target).backward()
            opt.step()
    else:
        def step():
            with torch.inference_mode():
                net(x)
    start = time.perf_counter()
    step()  # warm-up (compiles, when compiled)
    warmup_s = time.perf_counter() - start
    mib = 2**20
    state = grads = saved = 0.0
    if training:
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor)) / mib
        grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None) / mib
        own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in own:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), target)  # eager: what autograd keeps
        del loss
        saved = sum(kept.values()) / mib
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # reason: free memory glibc kept would inflate the peak
    with _PeakRSS() as peak:
        step()
        ms = median_ms(step, min_run_time)
    return {"ms": ms, "model_mib": size, "optimizer_mib": state, "grads_mib": grads, "saved_mib": saved,
            "rss_peak_mib": peak.peak / mib, "first_call_s": warmup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "TASK", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]), args.min_run_time)))
        return
    started = load()
    configs = [c for c in CONFIGS if not (args.no_compile and c[3])]
    results = {}
    for task, batch in TASKS:
        for name, *_ in configs:
            out = subprocess.run([sys.executable, __file__, "--one", name, task, str(batch),
                                  "--min-run-time", str(args.min_run_time)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} / {task} failed")
            results[(task, batch, name)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(task, batch, name, results[(task, batch, name)], flush=True)
    rows = []
    for task, batch in TASKS:
        for name, _, _, compiled in configs:
            r = results[(task, batch, name)]
            base = results[(task, batch, "dense, compiled" if compiled else "dense")]
            training = task.startswith("train")
            rows.append([task, batch, name, r["ms"], base["ms"] / r["ms"], r["model_mib"],
                         r["saved_mib"] if training else "", r["grads_mib"] if training else "",
                         r["optimizer_mib"] if training else "", r["rss_peak_mib"], r["first_call_s"]])
    headers = ["task", "batch", "model", "ms (median)", "speed-up vs dense", "model MiB", "saved for backward MiB",
               "gradients MiB", "AdamW state MiB", "peak RSS MiB", "first call s"]
    body = ("`speed-up vs dense` compares with the dense model run the same way (eager with eager, compiled "
            "with compiled). `saved for backward`: what autograd keeps between forward and backward (eager "
            "forward, parameters not counted: a converted model keeps no dense weight, with or without "
            "`checkpoint=True`). `peak RSS`: the process's resident set at its highest during the timed calls "
            "(after a warm-up call and `malloc_trim`). `first call` includes compilation.\n\n"
            + table(rows, headers))
    write("vit_b16", "Model level: timm ViT-B/16, dense vs RPQ (num_codebooks = 12), CPU fp32", body, started)


if __name__ == "__main__":
    main()
