"""The methods, each at each size, run on one task; one row of numbers per (method, size)."""

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import rpq_fx

from .rtn import rtn, rtn_bits
from .tasks import Task

MIB = 2**20


@dataclass(frozen=True)
class Size:
    """One RPQ setting: shared codebooks of ``num_codes`` codewords of ``codebook_dim`` values."""

    codebook_dim: int
    num_codes: int = 256

    @property
    def label(self) -> str:
        return f"d={self.codebook_dim}, K={self.num_codes}, shared"

    @property
    def index_bits(self) -> float:
        """Information in the codes per weight, log2(K) / d (codes are stored one byte each for K <= 256)."""
        return math.log2(self.num_codes) / self.codebook_dim


# label -> how: convert()'s init=, whether calibration= gets the task's calibration inputs, then finetune()
RPQ_METHODS = {
    "random RPQ": dict(init="random"),
    "k-means": dict(init="kmeans"),
    "data-aware": dict(init="kmeans", calibration=True),
    "data-aware + fine-tuning": dict(init="kmeans", calibration=True, finetune=True),
}
RTN_METHOD = "RTN (per-row int)"
VALIDATE_EVERY = 5  # fine-tuning steps between validations


def weight_filter(weights) -> Callable:
    """The ``filter_fn`` that lets through exactly the weights named in ``weights``: asked with a
    layer and its name, or with a weight read by a functional op and the weight's own name."""
    names = set(weights)
    return lambda layer, name: (name if isinstance(layer, nn.Parameter) else f"{name}.weight") in names


def _dense_bytes(model: nn.Module) -> int:
    return round(rpq_fx.model_size(model) * MIB)


def _row(task: Task, method: str, setting: str, stored_bits: int, dense_bits: int, model_bytes: tuple[int, int],
         metrics: dict, seconds: float, **extra) -> dict:
    numel = sum(p.numel() for p in task.weights.values())
    before, after = model_bytes
    return {"method": method, "setting": setting, "bits_per_weight": stored_bits / numel,
            "weights_ratio": dense_bits / stored_bits, "model_ratio": before / after, "model_mib": after / MIB,
            **metrics, "seconds": seconds, **extra}


def run_rtn(task: Task, bits: int) -> dict:
    start = time.perf_counter()
    model = rtn(task.model, task.weights, bits)
    metrics = task.evaluate(model)
    stored, dense = rtn_bits(task.weights, bits)
    before = _dense_bytes(task.model)
    after = before - dense // 8 + math.ceil(stored / 8)
    return _row(task, RTN_METHOD, f"int{bits}", stored, dense, (before, after), metrics, time.perf_counter() - start,
                index_bits=bits)


def _converted_bits(task: Task, model: nn.Module) -> tuple[int, int, dict]:
    """Stored and dense bits of the converted weights, from the report; they must be ``task.weights``."""
    rep = rpq_fx.report(model)
    rows = [r for r in rep.rows if r["K"] is not None]
    names = {r["layer"] for r in rows}
    if names != set(task.weights):
        raise RuntimeError(f"{task.name}: the converted weights differ from the selection in "
                           f"{sorted(names ^ set(task.weights))}")
    return 8 * sum(r["bytes after"] for r in rows), 8 * sum(r["bytes before"] for r in rows), rep.totals


def _convert(task: Task, size: Size, spec: dict, seed: int) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    model = rpq_fx.convert(task.model, codebook_dim=size.codebook_dim, num_codes=size.num_codes, shared_codebooks=True,
                           init=spec["init"], calibration=task.calibration if spec.get("calibration") else None,
                           filter_fn=weight_filter(task.weights), seed=seed, progress=False).eval()
    return model, time.perf_counter() - start


def _finetune(task: Task, model: nn.Module, steps: int) -> dict:
    """Distil the dense model into ``model`` (in place) on the calibration inputs, the last quarter
    of them held out as ``finetune``'s validation (the best validated state is kept); fewer than
    four batches (--quick) leave none to hold out."""
    start = time.perf_counter()
    kwargs = {"lr": task.finetune_lr} if task.finetune_lr else {}
    train = len(task.calibration) - len(task.calibration) // 4
    losses = rpq_fx.finetune(model, copy.deepcopy(task.model), task.calibration[:train], steps=steps,
                             validation=task.calibration[train:] or None, validate_every=VALIDATE_EVERY,
                             progress=False, **kwargs)
    model.eval()
    return dict(finetune_s=time.perf_counter() - start, finetune_steps=steps, loss_first=float(losses[0]),
                loss_last=float(losses[-1]))


def _rpq_row(task: Task, method: str, size: Size, model: nn.Module, extra: dict) -> dict:
    start = time.perf_counter()
    metrics = task.evaluate(model)
    extra["eval_s"] = time.perf_counter() - start
    stored, dense, totals = _converted_bits(task, model)
    errors = [r["fit err"] for r in rpq_fx.report(model).rows if r.get("fit err") is not None]
    if errors:
        extra["fit_err_mean"] = sum(errors) / len(errors)
    if totals.get("bits_per_weight") is not None:
        extra["report_bits_per_weight"] = totals["bits_per_weight"]
    return _row(task, method, size.label, stored, dense, (totals["bytes_before"], totals["bytes_after"]), metrics,
                sum(v for k, v in extra.items() if k.endswith("_s")), index_bits=size.index_bits,
                codebook_dim=size.codebook_dim, num_codes=size.num_codes, **extra)


def run_rpq(task: Task, methods: list[str], size: Size, finetune_steps: int, seed: int = 0):
    """Each of ``methods`` (keys of ``RPQ_METHODS``) at ``size``: yields ``(method, row)``. Fine-tuning
    starts from a copy of the data-aware conversion (converted once for both)."""
    data_aware = None
    for method in methods:
        spec = RPQ_METHODS[method]
        if spec.get("finetune") and data_aware is not None:
            model, convert_s = copy.deepcopy(data_aware[0]), data_aware[1]
        else:
            model, convert_s = _convert(task, size, spec, seed)
            if spec.get("calibration") and not spec.get("finetune"):
                data_aware = (model, convert_s)
        extra = {"convert_s": convert_s}
        if spec.get("finetune"):
            extra.update(_finetune(task, model, finetune_steps))
        yield method, _rpq_row(task, method, size, model, extra)


def run_dense(task: Task) -> dict:
    start = time.perf_counter()
    metrics = task.evaluate(task.model)
    bits = 8 * sum(p.numel() * p.element_size() for p in task.weights.values())
    size = _dense_bytes(task.model)
    row = _row(task, "dense", "fp32", bits, bits, (size, size), metrics, time.perf_counter() - start)
    row["index_bits"] = 32
    return row
