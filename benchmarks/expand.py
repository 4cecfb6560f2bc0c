"""Expansion speed: ``rpq_fx::expand`` against a memory copy of the same dense weight.

For each shape, in one process: the median time to expand the codebooks into the dense weight,
the median time of ``W.clone()`` (the memory-copy floor), and the same for a batch-8 linear
layer that expands then multiplies against a dense ``F.linear``. Writes a Markdown table to
``benchmarks/results/expand_<device>.md``.

    python benchmarks/expand.py [--device cpu|cuda] [--min-run-time 0.5]
"""

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.utils.benchmark import Timer

from rpq_fx.nn import RPQWeight

# (label, rows N, row length, num_codebooks C, shared codebooks)
SHAPES = [
    ("ViT-B qkv", 2304, 768, 12, False),
    ("ViT-B mlp.fc1", 3072, 768, 12, False),
    ("GPT-2 mlp.c_proj", 768, 3072, 48, False),
    ("4096x4096, C=16", 4096, 4096, 16, False),
    ("OPT-66b q_proj, C=72", 9216, 9216, 72, False),
    ("4096x4096, PQ d=8 shared", 4096, 4096, 512, True),
]


def median_ms(stmt: str, min_run_time: float, **env) -> float:
    return Timer(stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for label, n, row, c, shared in SHAPES:
        weight = RPQWeight(c, row // c, n, shared_codebooks=shared, device=device)
        dense = weight().detach().clone()
        x = torch.randn(8, row, device=device)
        env = dict(weight=weight, dense=dense, x=x, F=F, torch=torch)
        with torch.no_grad():
            expand = median_ms("weight()", args.min_run_time, **env)
            clone = median_ms("dense.clone()", args.min_run_time, **env)
            rpq_linear = median_ms("F.linear(x, weight())", args.min_run_time, **env)
            dense_linear = median_ms("F.linear(x, dense)", args.min_run_time, **env)
        rows.append([label, f"{n}x{row}", c, row // c, "yes" if shared else "no", expand, clone, expand / clone,
                     rpq_linear, dense_linear, rpq_linear / dense_linear])
        print(rows[-1])
    headers = ["layer", "W", "C", "d", "shared", "expand ms", "W.clone() ms", "expand / clone",
               "expand+linear b8 ms", "dense linear b8 ms", "expand+linear / dense"]
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    text = (f"# Expansion vs memory copy ({device.type}, fp32, K=256, {where}, torch {torch.__version__})\n\n"
            f"Command: `python benchmarks/expand.py --device {device.type}`; medians of "
            f"`torch.utils.benchmark`, one process.\n\n"
            + tabulate(rows, headers=headers, tablefmt="github", floatfmt=".2f") + "\n")
    out = Path(__file__).parent / "results" / f"expand_{device.type}.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
