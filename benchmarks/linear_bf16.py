"""bfloat16 RPQ linear on the CPU against dense ``F.linear`` in float32 and in bfloat16.

Two layers, 4096x4096 with 256 codewords: the RPQ setting (16 codebooks, d = 256) and the fitted product-quantization
setting (one shared codebook, d = 4: batches of one or two rows compute through 32-bit lookup tables in registers
where the CPU has AVX-512 VBMI, bfloat16 as float32). Each call is timed in one process: the median
wall time (``torch.utils.benchmark``) and the CPU time per call (``time.process_time`` over as
many calls: on a shared machine the wall time includes waiting for a core, the CPU time does not).
Variants: dense ``F.linear`` (float32, bfloat16), ``rpq_fx::linear`` in float32 and bfloat16 as
``RPQLinear`` runs it (``auto``: the path the policy picks), and bfloat16 on the stock-op kernels
(``rpq_fx.ops.stock_ops``: how bfloat16 ran before the C++ kernels served it). Forward+backward
computes every input's and parameter's gradient.

Writes ``benchmarks/results/linear_bf16_cpu.md``.

    python benchmarks/linear_bf16.py [--quick] [--threads 1]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, median_ms, table, write  # noqa: E402

from rpq_fx.nn import RPQLinear  # noqa: E402
from rpq_fx.ops import choose_path, linear, stock_ops  # noqa: E402

IN, OUT = 4096, 4096
LAYERS = [("RPQ C=16 (d=256)", 16, False), ("PQ d=4 shared", 1024, True)]  # label, codebooks, shared


def cpu_ms(fn, calls: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def measure(fn, min_run_time: float) -> tuple[float, float]:
    wall = median_ms(fn, min_run_time)
    return wall, cpu_ms(fn, max(3, min(200, int(min_run_time * 1e3 / max(wall, 1e-3)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1, 8 and 512, shorter runs")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [1, 8, 512] if args.quick else [1, 8, 64, 512]
    min_run_time = 0.1 if args.quick else 0.3
    started = load()
    rows = []
    for label, C, shared in LAYERS:
        rows += layer_rows(label, C, shared, batches, min_run_time)
    headers = ["layer", "batch", "mode", "dense fp32 ms", "rpq fp32 ms", "dense bf16 ms", "rpq bf16 ms",
               "rpq bf16 stock ops ms", "bf16 auto chose", "dense fp32 / rpq bf16", "dense bf16 / rpq bf16",
               "stock / C++ (bf16)"]
    body = (f"Layers {IN}x{OUT}, K=256. Each cell: median wall ms per call (CPU ms per call "
            "in brackets: above the wall time when several threads compute; below it when the machine is shared and "
            "the call waits for a core). Ratios are of CPU times; above 1: the RPQ bf16 call is faster.\n\n"
            + table(rows, headers, floatfmt=".2f"))
    write("linear_bf16_cpu", "bfloat16 RPQ linear vs dense F.linear (cpu)", body, started)


def layer_rows(label: str, C: int, shared: bool, batches: list[int], min_run_time: float) -> list[list]:
    torch.manual_seed(0)
    layer = RPQLinear(IN, OUT, C, shared_codebooks=shared)
    cb32, codes, bias32 = layer.weight.codebooks.detach(), layer.weight.codes, layer.bias.detach()
    w32 = layer.weight().detach()
    tensors = {torch.float32: (cb32, bias32, w32),
               torch.bfloat16: (cb32.bfloat16(), bias32.bfloat16(), w32.bfloat16())}
    rows = []
    for batch in batches:
        x32 = torch.randn(batch, IN)
        calls = {}
        for dtype, (cb, bias, w) in tensors.items():
            x = x32.to(dtype)
            leaves = [t.clone().requires_grad_() for t in (x, cb, bias, w)]
            grad = torch.randn(batch, OUT, dtype=dtype)
            name = "fp32" if dtype == torch.float32 else "bf16"
            calls[f"dense {name}"] = (lambda x=x, w=w, b=bias: F.linear(x, w, b),
                                      lambda l=leaves, g=grad: F.linear(l[0], l[3], l[2]).backward(g))
            calls[f"rpq {name}"] = (lambda x=x, cb=cb, b=bias: linear(x, cb, codes, b),
                                    lambda l=leaves, g=grad: linear(l[0], l[1], codes, l[2]).backward(g))
        chosen = {m: choose_path(x32.bfloat16(), tensors[torch.bfloat16][0], codes, backward=m != "inference")
                  for m in ("inference", "forward+backward")}
        for mode, index in (("inference", 0), ("forward+backward", 1)):
            t = {}
            for name, fns in calls.items():
                with torch.inference_mode(mode == "inference"):
                    t[name] = measure(fns[index], min_run_time)
            with stock_ops(), torch.inference_mode(mode == "inference"):
                t["rpq bf16 stock ops"] = measure(calls["rpq bf16"][index], min_run_time)
            rows.append([label, batch, mode, *(f"{w:.3f} ({c:.3f})" for w, c in t.values()), chosen[mode],
                         t["dense fp32"][1] / t["rpq bf16"][1], t["dense bf16"][1] / t["rpq bf16"][1],
                         t["rpq bf16 stock ops"][1] / t["rpq bf16"][1]])
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
