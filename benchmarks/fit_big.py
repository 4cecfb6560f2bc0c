"""Time and memory of ``init="kmeans"`` on one big layer, plain and data-aware (issue 19 item 7).

    python benchmarks/fit_big.py [--size 8192] [--tokens 2048] [--cases d4 rpq d4-cal rpq-cal]

Each case converts one ``Linear(size, size)`` (no bias) in a fresh subprocess, so that its resident
memory is its own: the process first runs a tiny conversion (imports, kernels), then resets its
peak RSS (``/proc/self/clear_refs``) and converts the big layer; "peak extra" is the peak RSS
during that conversion minus the RSS before it (the dense model and calibration inputs are
already there). The weight is structured as trained weights are (low rank plus noise); the
calibration inputs (``--tokens`` rows, in items of 512) are correlated, as activations are.
CPU time (``time.process_time``) is given beside wall time. Quality: the fit error
(``FitOutcome.error`` in the conversion record: the objective relative to an all-zero weight) and
the relative output error on 1024 held-out inputs. The load average is read before and after
each case (two cores shared with other work make times noisy). Writes ``results/fit_big.md``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, table, write  # noqa: E402

CASES = {
    "d4": ("k-means, d=4, one shared codebook, K=256", dict(codebook_dim=4, shared_codebooks=True), False),
    "rpq": ("k-means, RPQ default (max_codebook_dim=64), K=256", dict(max_codebook_dim=64), False),
    "d4-cal": ("data-aware, d=4, one shared codebook, K=256", dict(codebook_dim=4, shared_codebooks=True), True),
    "rpq-cal": ("data-aware, RPQ default (max_codebook_dim=64), K=256", dict(max_codebook_dim=64), True),
}


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) // 1024


def _data(size: int, tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(size, 16, generator=g) @ torch.randn(16, size, generator=g) * 0.05
    weight += 0.02 * torch.randn(size, size, generator=g)
    mix = torch.randn(64, size, generator=g) / 8

    def inputs(rows):
        return torch.randn(rows, 64, generator=g) @ mix + 0.1 * torch.randn(rows, size, generator=g)

    return weight, [inputs(512) for _ in range(max(1, tokens // 512))], inputs(1024)


def run_case(name: str, size: int, tokens: int) -> dict:
    """One case in this process: convert, measure, return the figures."""
    import torch
    from torch import nn

    import rpq_fx

    _, settings, calibrated = CASES[name]
    weight, calibration, held_out = _data(size, tokens)
    model = nn.Sequential(nn.Linear(size, size, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(weight)
    del weight
    warm = nn.Sequential(nn.Linear(64, 512)).eval()  # reason: imports and kernel loading are not the fit's memory
    rpq_fx.convert(warm, init="kmeans", calibration=[torch.randn(8, 64)] if calibrated else None, progress=False,
                   **settings)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    rpq = rpq_fx.convert(model, init="kmeans", calibration=calibration if calibrated else None, progress=False,
                         **settings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    extra = _status("VmHWM") - before
    with torch.no_grad():
        reference = model(held_out)
        output_error = float((rpq(held_out) - reference).square().sum() / reference.square().sum())
    record = rpq_fx.conversion_record(rpq)
    layer, fit = record.layers[0], record.fits[record.layers[0].name]
    return dict(seconds=seconds, cpu_seconds=cpu, extra_mib=extra, layer_mib=size * size * 4 / 2**20,
                fit_error=fit.error, output_error=output_error, init=fit.filled,
                split=f"C={layer.num_codebooks}, d={layer.codebook_dim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--one", choices=list(CASES), help=argparse.SUPPRESS)  # the subprocess's own case
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.size, args.tokens)))
        return
    started = load()
    rows = []
    for name in args.cases:
        load_before = os.getloadavg()[0]
        command = [sys.executable, __file__, "--one", name, "--size", str(args.size), "--tokens", str(args.tokens)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            figures = None
        load_after = os.getloadavg()[0]
        title, _, calibrated = CASES[name]
        shape = f"{args.size} x {args.size}"
        tokens = args.tokens if calibrated else "-"
        if figures is None:
            rows.append([title, shape, tokens, "-", f"> {args.timeout:.0f}", "-", "-", "-", "-", "-", "-",
                         f"{load_before:.1f} / {load_after:.1f}"])
            continue
        rows.append([title, shape, tokens, figures["split"], f"{figures['seconds']:.1f}",
                     f"{figures['cpu_seconds']:.1f}",
                     f"{figures['extra_mib']:.0f} ({figures['extra_mib'] / figures['layer_mib']:.2f}x)",
                     f"{args.size * args.size / figures['seconds'] / 1e6:.2f}", f"{figures['fit_error']:.4f}",
                     f"{figures['output_error']:.4f}", figures["init"], f"{load_before:.1f} / {load_after:.1f}"])
        print(rows[-1], flush=True)
    headers = ["case", "layer (out x in)", "calibration rows", "split", "seconds", "CPU s",
               "peak extra MiB (x layer)", "M params / s", "fit error", "held-out output error", "init",
               "load before / after (1 min)"]
    body = (f"One `Linear({args.size}, {args.size})` (fp32, {args.size * args.size * 4 / 2**20:.0f} MiB) converted "
            "with `init=\"kmeans\"`, each case in its own process. Peak extra: peak RSS during the conversion "
            "minus RSS before it. CPU s: the process's CPU time (all threads; on a loaded machine the wall time "
            "inflates, the CPU time less). M params / s: the layer's parameters over the wall seconds. Fit error: "
            "the fit's objective relative to an all-zero weight (data-aware: "
            "the output error on the calibration inputs). Targets (issue 19 item 7): k-means < 30 s, "
            "data-aware < 90 s, peak extra <= 2x the layer.\n\n" + table(rows, headers, disable_numparse=True))
    write("fit_big", "The fit on one big layer: time and memory", body, started)


if __name__ == "__main__":
    main()
