"""Calibration: what each layer of the dense model sees, gathered with forward hooks.

A linear or convolution layer gets ``H = Σ x xᵀ`` over its input rows (a convolution's input
patches, in the order of its weight's rows); an embedding gets how often each row was looked up.
These make the fit minimise the layer's output error instead of its weight error.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..passes import LayerPlan

__all__ = ["LayerStats", "collect_stats", "call_groups", "run_inputs"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerStats:
    """Input statistics of one weight, summed over every call of every layer that reads it."""

    hessian: Tensor | None = None  # [row length, row length], float64
    row_counts: Tensor | None = None  # [rows], float64

    def add_inputs(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        update = x.t() @ x
        self.hessian = update if self.hessian is None else self.hessian.add_(update)

    def add_lookups(self, indices: Tensor, rows: int) -> None:
        counts = torch.bincount(indices.detach().reshape(-1).long(), minlength=rows).double()
        self.row_counts = counts if self.row_counts is None else self.row_counts.add_(counts)


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """``[positions, in/groups * prod(kernel)]`` input patches of a convolution, averaged over its
    groups (every group's rows then share one ``H``, an approximation where groups > 1)."""
    dims = len(layer.kernel_size)
    if isinstance(layer.padding, str):  # "valid" or "same"
        pad = [0] * dims if layer.padding == "valid" else [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        pairs = [(p // 2, p - p // 2) for p in pad]
    else:
        pairs = [(p, p) for p in layer.padding]
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, [v for pair in reversed(pairs) for v in pair], mode=mode)
    for i, (k, s, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel dim per spatial dim
    batch, channels = x.shape[:2]
    groups = layer.groups
    # [B, g, C/g, L..., k...] -> [B, L..., g, C/g, k...] -> [B * L * g, C/g * prod(k)]
    x = x.reshape(batch, groups, channels // groups, *x.shape[2:])
    order = [0, *range(3, 3 + dims), 1, 2, *range(3 + dims, 3 + 2 * dims)]
    return x.permute(order).reshape(-1, channels // groups * math.prod(layer.kernel_size))


def _observer(layer: nn.Module, plan: LayerPlan, stats: LayerStats):
    """A forward pre-hook adding one call's input to ``stats``, or None for a layer kind with no such statistic."""
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        return lambda module, args, kwargs: stats.add_lookups(kwargs.get("input", args[0] if args else None),
                                                              plan.shape[0])
    if isinstance(layer, _CONV):
        return lambda module, args, kwargs: stats.add_inputs(_patches(module, kwargs.get("input", args[0])))
    if isinstance(layer, nn.Linear) or (plan.transposed and type(layer).__name__ == "Conv1D"):  # GPT-2's Conv1D
        return lambda module, args, kwargs: stats.add_inputs(kwargs.get("input", args[0] if args else kwargs.get("x")))
    return None


def run_inputs(model: nn.Module, inputs, device: torch.device | None = None):
    """Call ``model`` on one calibration item: a tensor, a tuple of positional inputs or a dict of keywords."""
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    if isinstance(inputs, dict):
        return model(**{k: move(v) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return model(*map(move, inputs))
    return model(move(inputs))


def _layers(model: nn.Module, plan: LayerPlan):
    """The layers of ``model`` that read ``plan``'s weight as their own ``weight``."""
    for alias in plan.aliases:
        owner, _, attribute = alias.rpartition(".")
        if attribute == "weight":
            yield model.get_submodule(owner)


class _Enough(Exception):
    """Raised by a hook once every layer of interest has seen the current item: the rest of the forward is skipped."""


def _run(model: nn.Module, calibration: Iterable, replaced: dict[str, Tensor], hooks: list, progress: bool,
         before_item=lambda: None) -> None:
    """Run ``model`` in eval mode without grad on every calibration item, with ``hooks``
    (``(layer, pre-hook)``) attached and the parameters in ``replaced`` swapped in
    (``torch.func.functional_call``), leaving its modes and tensors as they were. A hook may
    raise :class:`_Enough` to end the item's forward early."""
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in hooks]
    modes = {module: module.training for module in model.modules()}
    device = next((p.device for p in model.parameters()), None)
    try:
        model.eval()
        with torch.no_grad():
            for inputs in tqdm(calibration, desc="rpq_fx calibration", unit="batch", delay=2, disable=not progress):
                before_item()
                try:
                    if replaced:
                        args, kwargs = ((), inputs) if isinstance(inputs, dict) else (
                            (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {})
                        torch.func.functional_call(model, replaced, _moved(args, device), _moved(kwargs, device),
                                                   strict=False)
                    else:
                        run_inputs(model, inputs, device)
                except _Enough:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training


def _moved(values, device):
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    return {k: move(v) for k, v in values.items()} if isinstance(values, dict) else tuple(map(move, values))


def call_groups(model: nn.Module, plans: list[LayerPlan], inputs) -> tuple[list[list[LayerPlan]], set[str]]:
    """The observable converted plans in the order ``model`` first calls them on ``inputs``, grouped
    where consecutive layers read the same input tensor (a block's query, key and value), and the
    names of those read by exactly one call."""
    seen: dict[str, int] = {}
    groups: list[list[LayerPlan]] = []
    last = [None]

    def watcher(plan):
        def hook(module, args, kwargs):
            x = kwargs.get("input", args[0] if args else None)
            if plan.name in seen:
                seen[plan.name] += 1
                return
            seen[plan.name] = 1
            key = x.data_ptr() if isinstance(x, Tensor) else None
            if key is None or key != last[0] or not groups:
                groups.append([])
            groups[-1].append(plan)
            last[0] = key
        return hook

    hooks = [(layer, watcher(plan)) for plan in plans if plan.converted
             for layer in _layers(model, plan) if _observer(layer, plan, LayerStats()) is not None]
    _run(model, [inputs], {}, hooks, progress=False)
    return groups, {name for name, calls in seen.items() if calls == 1}


def collect_stats(model: nn.Module, plans: list[LayerPlan], calibration: Iterable, *,
                  replaced: dict[str, Tensor] | None = None, stop_early: bool = False,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Run ``model`` (dense, untouched: eval mode and no grad for the duration) on every calibration
    item and return the statistics of each converted plan that a layer hook can observe, by plan name.
    ``replaced`` maps parameter names to values the run uses instead (already quantised layers);
    ``stop_early`` ends each forward once every plan's layer has been called (for layers called once).

    A weight read by several layers sums their statistics; one read by both an embedding lookup
    and a linear layer (a tied ``lm_head``) keeps the linear's, whose output error is the larger concern.
    """
    stats: dict[str, LayerStats] = {}
    hooks = []
    pending: set[str] = set()

    def watched(plan: LayerPlan, observe):
        def hook(module, args, kwargs):
            observe(module, args, kwargs)
            pending.discard(plan.name)
            if stop_early and not pending:
                raise _Enough
        return hook

    for plan in (p for p in plans if p.converted):
        for layer in _layers(model, plan):
            observe = _observer(layer, plan, stats.setdefault(plan.name, LayerStats()))
            if observe is not None:
                hooks.append((layer, watched(plan, observe)))
    names = {plan.name for plan in plans if plan.converted}
    _run(model, calibration, replaced or {}, hooks, progress, before_item=lambda: pending.update(names))
    for value in stats.values():
        if value.hessian is not None:
            value.row_counts = None
    return {name: value for name, value in stats.items() if value.hessian is not None or value.row_counts is not None}
