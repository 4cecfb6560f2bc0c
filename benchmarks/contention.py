"""The compressed-domain linear under CPU contention: does it slow down more than dense when another process
competes for the cores?

Issue 23: on a loaded machine the C++ kernel at 2 threads once ran 5x slower than dense where on a quiet one it
was 9x faster (statically split work waiting for the slowest thread). The forward now cuts its work into tasks
that the threads claim one at a time, and both the lookup-table path (batches of one or two rows) and the batched
kernel at short slices (d < 16: every product-quantization row here) share their tasks with a helper thread without
ever waiting for one that has not started (``split_phases``); long slices (the RPQ row) still join through
``at::parallel_for``. Here each layer is timed (median wall and CPU time,
dense and auto called in turn) in one process, first alone, then with one busy-loop process per core beside it; the
ratio busy / alone is each path's slowdown, and the target is ``auto``'s slowdown within 1.5x of dense
``F.linear``'s.

Writes ``benchmarks/results/contention.md``.

    python benchmarks/contention.py [--quick] [--busy 1]
"""

import argparse
import subprocess
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, table, write  # noqa: E402

from rpq_fx.nn import RPQLinear  # noqa: E402
from rpq_fx.ops import choose_path, linear  # noqa: E402

LAYERS = [  # label, num_codebooks, shared, num_codes (4096x4096)
    ("RPQ C=16 (d=256)", 16, False, 256),
    ("PQ d=4 shared", 1024, True, 256),
    ("PQ d=8 shared", 512, True, 256),
]
BUSY = "while True: pass"


def time_all(cases, min_run_time: float, min_rounds: int = 7) -> dict:
    """``{(key, "dense" | "auto"): (median wall ms, median CPU ms)}`` and ``{key: load}``: per case, rounds that call
    dense and auto in turn (so that whatever else runs slows both alike) until each ran ``min_run_time`` seconds."""
    out, loads = {}, {}
    with torch.inference_mode():
        for key, (x, weight, cb, codes) in cases.items():
            calls = {"dense": lambda: F.linear(x, weight), "auto": lambda: linear(x, cb, codes, None, "auto")}
            wall, cpu = {n: [] for n in calls}, {n: [] for n in calls}
            for fn in calls.values():
                fn()
            loads[key] = os.getloadavg()[0]
            while min(len(v) for v in wall.values()) < min_rounds or min(sum(v) for v in wall.values()) < min_run_time:
                for name, fn in calls.items():
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - w)
            for name in calls:
                out[key, name] = (statistics.median(wall[name]) * 1e3, statistics.median(cpu[name]) * 1e3)
    return out, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32 only, shorter runs")
    parser.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the timed one (default 1)")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    batches = [1, 32] if args.quick else [1, 8, 32, 64]
    min_run_time = 0.2 if args.quick else args.min_run_time
    started = load()
    torch.manual_seed(0)
    cases = {}
    for label, c, shared, k in LAYERS:
        layer = RPQLinear(4096, 4096, c, bias=False, shared_codebooks=shared, num_codes=k)
        cb, codes = layer.weight.codebooks.detach(), layer.weight.codes
        weight = layer.weight().detach()
        for batch in batches:
            cases[label, batch] = (torch.randn(batch, 4096), weight, cb, codes)
    alone, load_alone = time_all(cases, min_run_time)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)  # reason: let the scheduler spread the busy loops before timing
        loaded, load_busy = time_all(cases, min_run_time)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    rows = []
    for (label, batch), (x, _, cb, codes) in cases.items():
        key = (label, batch)
        slow_dense = loaded[key, "dense"][0] / alone[key, "dense"][0]
        slow_auto = loaded[key, "auto"][0] / alone[key, "auto"][0]
        rows.append([label, batch, choose_path(x, cb, codes), alone[key, "dense"][0], alone[key, "auto"][0],
                     loaded[key, "dense"][0], loaded[key, "auto"][0], slow_dense, slow_auto, slow_auto / slow_dense,
                     "met" if slow_auto <= 1.5 * slow_dense else "MISSED",
                     f"{alone[key, 'dense'][1]:.2f} / {alone[key, 'auto'][1]:.2f}",
                     f"{loaded[key, 'dense'][1]:.2f} / {loaded[key, 'auto'][1]:.2f}",
                     f"{load_alone[key]:.2f} / {load_busy[key]:.2f}"])
        print(rows[-1], flush=True)
    headers = ["layer (4096x4096)", "batch", "auto chose", "dense ms alone", "auto ms alone", "dense ms busy",
               "auto ms busy", "dense slowdown", "auto slowdown", "auto / dense slowdown", "<= 1.5x",
               "CPU ms alone, dense / auto", "CPU ms busy, dense / auto", "load (1 min) alone / busy"]
    body = (f"Median wall time per call, `{torch.get_num_threads()}` threads, alone and then with {args.busy} "
            f"busy-loop process(es) (`{BUSY}`) beside it, in one process, dense and auto called in turn. `slowdown`: "
            "busy / alone; CPU ms: median process CPU time per call (all threads); load: the 1-minute load average "
            "when the row's timing began (it includes the busy loops and anything else on the machine).\n\n"
            + table(rows, headers))
    write("contention", "The compressed-domain linear under CPU contention", body, started)


if __name__ == "__main__":
    main()
