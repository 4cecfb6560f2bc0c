"""CPU latency of a model against the dense one, interleaved so that a shared machine's load hits both."""

import statistics
import time

import torch


def example(task, batch: int):
    """``batch`` inputs drawn from the task's calibration data (a dict of tensors or one tensor)."""
    items = task.calibration
    if isinstance(items[0], dict):
        item = next((i for i in items if len(next(iter(i.values()))) >= batch), None)
        if item is None:
            raise ValueError(f"{task.name}: no calibration batch holds {batch} inputs")
        return {k: v[:batch] for k, v in item.items()}
    return torch.cat(list(items))[:batch]


def _call(model, x):
    return model(**x) if isinstance(x, dict) else model(x)


def _block(model, x, n: int) -> tuple[float, float]:
    """Wall and CPU seconds per call over ``n`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        _call(model, x)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def latency(dense, model, x, rounds: int = 5, block_s: float = 0.08) -> dict:
    """Median per-call wall and CPU milliseconds of ``model`` and ``dense`` on ``x``, measured in
    alternating blocks (dense, model, dense, ...), and the ratio of the medians (model / dense)."""
    with torch.inference_mode():
        _call(dense, x), _call(model, x)  # warm-up: first-call caches, lazy packing
        one, _ = _block(dense, x, 1)
        n = max(1, round(block_s / max(one, 1e-6)))
        samples = {"dense": [], "model": []}
        for _ in range(rounds):
            samples["dense"].append(_block(dense, x, n))
            samples["model"].append(_block(model, x, n))
    med = {k: (statistics.median(w for w, _ in v) * 1e3, statistics.median(c for _, c in v) * 1e3)
           for k, v in samples.items()}
    return {"ms": med["model"][0], "cpu_ms": med["model"][1], "dense_ms": med["dense"][0],
            "dense_cpu_ms": med["dense"][1], "ratio": med["model"][0] / med["dense"][0]}
