"""The per-call cost of one checkout's ``rpq_fx::linear`` against another's, on the same shapes.

Measures what a change to the ops (e.g. the code-range checks of issue 19) costs: run it once per
checkout, each in its own process, then compare the two JSON files. Compressed path, fp32, batch 1
and 32; K=16 shapes are those where the range check runs (with K=256 every uint8 code is valid).

    PYTHONPATH=/path/to/old/checkout python benchmarks/op_overhead.py --out old.json
    python benchmarks/op_overhead.py --out new.json
    python benchmarks/op_overhead.py --compare old.json new.json [--markdown results/op_overhead.md]
"""

import argparse
import json
import platform
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.benchmark import Timer

SHAPES = [("RPQ 4096x4096 C=16 K=256", 16, 256, 256, False), ("RPQ 4096x4096 C=16 K=16", 16, 256, 16, False),
          ("PQ 4096x4096 d=8 shared K=256", 512, 8, 256, True), ("PQ 4096x4096 d=4 shared K=16", 1024, 4, 16, True)]
BATCHES = (1, 32)


def _ms(fn) -> float:
    """Best of three medians, in milliseconds."""
    return min(Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median for _ in range(3)) * 1e3


def measure() -> list[dict]:
    import rpq_fx  # noqa: F401  (registers the ops of whichever checkout is on the path)

    torch.manual_seed(0)
    rows = []
    for label, num_codebooks, dim, num_codes, shared in SHAPES:
        codebooks = torch.randn(1 if shared else num_codebooks, num_codes, dim)
        codes = torch.randint(0, num_codes, (num_codebooks, 4096), dtype=torch.uint8)
        for batch in BATCHES:
            x = torch.randn(batch, num_codebooks * dim)
            call = (lambda: torch.ops.rpq_fx.linear(x, codebooks, codes, None, "compressed"))
            call()
            rows.append({"shape": label, "batch": batch, "ms": _ms(call)})
    return rows


def compare(before: list[dict], after: list[dict]) -> str:
    table = [[a["shape"], a["batch"], a["ms"], b["ms"], b["ms"] / a["ms"]] for a, b in zip(before, after)]
    return tabulate(table, headers=["shape", "batch", "before ms", "after ms", "after / before"],
                    tablefmt="github", floatfmt=".3f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write this checkout's timings here (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--markdown", type=Path, help="with --compare: also write the table here")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        text = compare(before, after)
        print(text)
        if args.markdown:
            args.markdown.write_text(f"# rpq_fx::linear per call: one checkout against another\n\n"
                                     f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
                                     f"{torch.__version__}. Command: see `benchmarks/op_overhead.py`.\n\n{text}\n")
        return
    rows = measure()
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
