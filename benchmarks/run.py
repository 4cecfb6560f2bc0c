"""Run the benchmark suite: each script in its own process, each against the dense baseline.

    python benchmarks/run.py                 # everything (about an hour on 2 CPU cores)
    python benchmarks/run.py --quick         # fewer batch sizes, shorter runs, no torch.compile
    python benchmarks/run.py linear vit_b16  # only these

Results land in ``benchmarks/results/`` (Markdown tables, ``linear_cpu.png``, ``quality.png``). Timings
on a shared machine move with its load: each table records the load average before and after it ran.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# name: (arguments, arguments with --quick)
SCRIPTS = {
    "expand": ([], ["--min-run-time", "0.1"]),
    "linear": ([], ["--quick"]),
    "embedding": ([], ["--quick"]),
    "static_sizes": ([], []),
    "vit_b16": ([], ["--no-compile", "--min-run-time", "0.3"]),
    "opt66b": ([], ["--prompt", "4", "--new-tokens", "3"]),  # needs about 6.5 GB of memory
    "quality": ([], ["--quick"]),  # pretrained MiniLM / EfficientNet-Lite0 / digits CNN: RPQ fits vs RTN
    # MiniLM at about 2 bits: per-group loss, mixed configurations
    "minilm_low_bits": ([], ["--steps", "2", "--sizes", "6", "3", "--finetune-lines", "64",
                             "--calibration-lines", "512"]),
    "model_speed": ([], ["--quick"]),  # MiniLM at 2 bits, resnet50 and convnext_tiny under RPQ, against dense
    "damp": ([], ["--damps", "0.01", "0.1", "--wide-lines", "512"]),  # the calibrated fit's damping, per task
    # what limits MiniLM at 2.0 bits from 256 lines: the word embedding's token coverage, damping
    "minilm_heldout": ([], ["--damps", "0.1", "--no-allocate"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", metavar="SCRIPT", help=f"run only these ({', '.join(SCRIPTS)})")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    unknown = [name for name in args.only if name not in SCRIPTS]
    if unknown:
        parser.error(f"unknown script {', '.join(unknown)}: choose from {', '.join(SCRIPTS)}")
    failed = []
    for name in args.only or SCRIPTS:
        full, quick = SCRIPTS[name]
        command = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(command[1:])} (load {os.getloadavg()[0]:.2f})", flush=True)
        start = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
