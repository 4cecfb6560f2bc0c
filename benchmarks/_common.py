"""Shared by the benchmark scripts: medians from ``torch.utils.benchmark``, the machine line, tables."""

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.benchmark import Timer

RESULTS = Path(__file__).parent / "results"


def median_ms(fn, min_run_time: float) -> float:
    """Median wall time of ``fn()`` in milliseconds (``torch.utils.benchmark``, blocked autorange)."""
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def timed(fn):
    """``fn()``, its wall and CPU seconds, and the 1-minute load average before and after."""
    load_before, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu, load_before, os.getloadavg()[0]


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def machine(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    from rpq_fx import _kernels

    kernels = "C++ kernels" if _kernels.available() else "stock torch ops (no C++ kernels)"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"threads, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, {kernels}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def table(rows, headers, floatfmt=".2f", **options) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=floatfmt, **options)


def kept_notes(path: Path) -> str:
    """The hand-written ``## Notes`` section of an earlier results file (to the end), kept across reruns."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n## Notes")
    return text[at + 1:] if at >= 0 else ""


def write(name: str, title: str, body: str, load_before: str, directory: Path = RESULTS) -> Path:
    """``<directory>/<name>.md`` (``benchmarks/results/`` by default): title, command, machine and load, then ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (f"# {title}\n\nCommand: `{command()}`; {machine()}.\n"
            f"Load average when it started: {load_before}; when it ended: {load()}.\n\n{body.rstrip()}\n")
    path = directory / f"{name}.md"
    path.write_text(text)
    print(text)
    return path
