"""Calibration: what each layer of the dense model sees, gathered with forward hooks.

A linear or convolution layer gets ``H = Σ x xᵀ / ||W x||²`` over its input rows (a token, a
convolution's input patch, in the order of its weight's rows): the fit then minimises each row's
output error relative to that row's dense output, so a few tokens with massive outputs (BERT's)
cannot outweigh all the others. With layers before it already quantised, it can also get the
cross-covariance of the inputs the dense model gives it with those it gets (asymmetric calibration,
one more, dense, forward per item). An embedding gets how often each row was looked up. Positions a
dict input's ``attention_mask`` marks as padding are left out.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..passes import LayerPlan, training_mode

__all__ = ["LayerStats", "collect_stats", "call_groups", "drop_padding", "padding_mask", "run_inputs"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MIN_ENERGY = 0.01  # of the median: an input row weighs at most 100x a typical one (robust to massive rows)


@dataclass
class LayerStats:
    """Input statistics of one weight, summed over every call of every layer that reads it."""

    hessian: Tensor | None = None  # [row length, row length], float64
    row_counts: Tensor | None = None  # [rows], float64
    cross: Tensor | None = None  # [row length, row length], float64: Σ x_dense xᵀ, weighted as hessian
    unpaired: bool = False  # the dense model's calls and these did not pair up one to one (control flow differed)

    def add_inputs(self, x: Tensor, energy: Tensor, dense: Tensor | None = None) -> None:
        """Add input rows ``x [M, row length]`` weighted by one over their dense outputs' energy ``[M]``;
        ``dense``: the rows the dense model gives the layer on the same item, for ``cross``."""
        x = x.detach().double()
        energy = energy.detach().double()
        # reason: a row whose output is (almost) zero would otherwise weigh without bound
        weight = 1 / energy.clamp_min(_MIN_ENERGY * energy.median()).clamp_min(torch.finfo(torch.float64).tiny)
        update = (x.t() * weight) @ x
        self.hessian = update if self.hessian is None else self.hessian.add_(update)
        if dense is not None:
            update = (dense.detach().double().t() * weight) @ x
            self.cross = update if self.cross is None else self.cross.add_(update)

    def add_lookups(self, indices: Tensor, rows: int) -> None:
        counts = torch.bincount(indices.detach().reshape(-1).long(), minlength=rows).double()
        self.row_counts = counts if self.row_counts is None else self.row_counts.add_(counts)


def _patches(layer: nn.Module, x: Tensor) -> Tensor:
    """``[positions * groups, in/groups * prod(kernel)]`` input patches of a convolution, each group's
    its own row (every group's weight rows then share one ``H``, an approximation where groups > 1)."""
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


def _conv_inputs(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A convolution's input patches and the energy of each one's output (its group's channels)."""
    patches = _patches(layer, x)
    rows = layer.weight.detach().reshape(layer.groups, layer.out_channels // layer.groups, -1)
    grouped = patches.view(-1, layer.groups, patches.shape[-1])
    energy = torch.einsum("mgi,goi->mgo", grouped, rows).pow(2).sum(-1)
    return patches, energy.reshape(-1)


def drop_padding(x: Tensor, keep: Tensor | None, *, features: bool = True) -> Tensor:
    """``x`` without the positions ``keep [batch, length]`` marks False, where ``x`` is laid out
    ``[batch, length, features...]`` (or, ``features=False``, exactly ``[batch, length]``, as token
    ids are); anything else, or ``keep=None``, as it is."""
    if keep is None or x.shape[:2] != keep.shape or (x.dim() < 3 if features else x.dim() != 2):
        return x
    return x[keep.to(x.device)]


def _linear_inputs(x: Tensor, rows: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """A linear layer's input rows (padding positions dropped) and the energy of each one's output."""
    x = drop_padding(x, keep)
    x = x.reshape(-1, x.shape[-1])
    return x, (x @ rows.detach().t()).pow(2).sum(-1)


def _input_rows(layer: nn.Module, plan: LayerPlan, mask: dict):
    """A function of a forward pre-hook's ``(module, args, kwargs)`` giving the layer's input rows and
    the energy of each one's dense output, or None for a layer kind with no such statistic."""
    if isinstance(layer, _CONV):
        return lambda module, args, kwargs: _conv_inputs(module, kwargs.get("input", args[0]))
    if isinstance(layer, nn.Linear):
        return lambda module, args, kwargs: _linear_inputs(kwargs.get("input", args[0] if args else None),
                                                           module.weight, mask["keep"])
    if plan.transposed and type(layer).__name__ == "Conv1D":  # GPT-2's Conv1D: weight [in, out]
        return lambda module, args, kwargs: _linear_inputs(args[0] if args else kwargs.get("x"), module.weight.t(),
                                                           mask["keep"])
    return None


def _observer(layer: nn.Module, plan: LayerPlan, stats: LayerStats, mask: dict):
    """A forward pre-hook adding one call's input to ``stats``, or None for a layer kind with no such
    statistic; ``mask["keep"]`` is the current item's non-padding positions ``[batch, length]``, or None.
    While ``mask["dense"]`` is a dict the hook records the call's rows there (the dense model's pass
    over the item) instead; the next pass pairs them with its own, call by call, for ``cross``."""
    if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
        def lookups(module, args, kwargs):
            indices = kwargs.get("input", args[0] if args else None)
            stats.add_lookups(drop_padding(indices, mask["keep"], features=False), plan.shape[0])
        return lookups
    rows = _input_rows(layer, plan, mask)
    if rows is None:
        return None

    def observe(module, args, kwargs):
        x, energy = rows(module, args, kwargs)
        if mask.get("recording"):
            mask["dense"].setdefault(plan.name, []).append((x, energy))
        elif mask.get("dense") is not None:
            records = mask["dense"].get(plan.name)
            if records and records[0][0].shape == x.shape:
                dense, dense_energy = records.pop(0)
                stats.add_inputs(x, dense_energy, dense)
            else:
                stats.unpaired = True
                stats.add_inputs(x, energy)
        else:
            stats.add_inputs(x, energy)
    return observe


def padding_mask(inputs) -> Tensor | None:
    """The non-padding positions of a dict calibration item (its ``attention_mask``), else None."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _arguments(inputs, device) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one calibration item (a tensor, a tuple of positional inputs or a dict
    of keywords), its tensors moved to ``device``."""
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    if isinstance(inputs, dict):
        return (), {k: move(v) for k, v in inputs.items()}
    return tuple(map(move, inputs if isinstance(inputs, (tuple, list)) else (inputs,))), {}


def run_inputs(model: nn.Module, inputs, device: torch.device | None = None, replaced: dict[str, Tensor] | None = None):
    """Call ``model`` on one calibration item: a tensor, a tuple of positional inputs or a dict of
    keywords; with the parameters named in ``replaced`` swapped in (``torch.func.functional_call``)."""
    args, kwargs = _arguments(inputs, device)
    if replaced:
        return torch.func.functional_call(model, replaced, args, kwargs, strict=False)
    return model(*args, **kwargs)


def _layers(model: nn.Module, plan: LayerPlan):
    """The layers of ``model`` that read ``plan``'s weight as their own ``weight``."""
    for alias in plan.aliases:
        owner, _, attribute = alias.rpartition(".")
        if attribute == "weight":
            yield model.get_submodule(owner)


def _device(model: nn.Module) -> torch.device | None:
    """Where ``model``'s parameters are (calibration inputs go there), or None for a model without any."""
    return next((p.device for p in model.parameters()), None)


class _Enough(Exception):
    """Raised by a hook once every layer of interest has seen the current item: the rest of the forward is skipped."""


def _run(model: nn.Module, calibration: Iterable, replaced: dict[str, Tensor], hooks: list, progress: bool,
         before_item=lambda inputs: None) -> None:
    """Run ``model`` in eval mode without grad on every calibration item, with ``hooks``
    (``(layer, pre-hook)``) attached and the parameters in ``replaced`` swapped in
    (``torch.func.functional_call``), leaving its modes and tensors as they were. A hook may
    raise :class:`_Enough` to end the item's forward early."""
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in hooks]
    device = _device(model)
    try:
        with training_mode(model, False), torch.no_grad():
            for inputs in tqdm(calibration, desc="rpq_fx calibration", unit="batch", delay=2, disable=not progress):
                before_item(inputs)
                try:
                    run_inputs(model, inputs, device, replaced)
                except _Enough:
                    pass
    finally:
        for handle in handles:
            handle.remove()


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
             for layer in _layers(model, plan) if _observer(layer, plan, LayerStats(), {}) is not None]
    _run(model, [inputs], {}, hooks, progress=False)
    return groups, {name for name, calls in seen.items() if calls == 1}


def collect_stats(model: nn.Module, plans: list[LayerPlan], calibration: Iterable, *,
                  replaced: dict[str, Tensor] | None = None, stop_early: bool = False,
                  asymmetric: bool = False, progress: bool = True) -> dict[str, LayerStats]:
    """Run ``model`` (dense, untouched: eval mode and no grad for the duration) on every calibration
    item and return the statistics of each converted plan that a layer hook can observe, by plan name.
    ``replaced`` maps parameter names to values the run uses instead (already quantised layers);
    ``stop_early`` ends each forward once every plan's layer has been called (for layers called once);
    ``asymmetric`` (with ``replaced``) first runs the dense model on each item too, so that each
    layer's statistics pair what it gets there with what it gets here (``LayerStats.cross``).

    A weight read by several layers sums their statistics; one read by both an embedding lookup
    and a linear layer (a tied ``lm_head``) keeps the linear's, whose output error is the larger concern.
    """
    stats: dict[str, LayerStats] = {}
    hooks = []
    pending: set[str] = set()
    mask = {"keep": None}

    def watched(plan: LayerPlan, observe):
        def hook(module, args, kwargs):
            observe(module, args, kwargs)
            pending.discard(plan.name)
            if stop_early and not pending:
                raise _Enough
        return hook

    for plan in (p for p in plans if p.converted):
        for layer in _layers(model, plan):
            observe = _observer(layer, plan, stats.setdefault(plan.name, LayerStats()), mask)
            if observe is not None:
                hooks.append((layer, watched(plan, observe)))
    names = {plan.name for plan in plans if plan.converted}

    device = _device(model)

    def check_paired():
        for name, records in mask.get("dense", {}).items():
            stats[name].unpaired |= bool(records)  # dense calls left over

    def before_item(inputs):
        pending.update(names)
        mask["keep"] = padding_mask(inputs)
        if asymmetric and replaced:
            check_paired()
            mask["dense"], mask["recording"] = {}, True
            try:
                run_inputs(model, inputs, device)
            except _Enough:
                pass
            mask["recording"] = False
            pending.update(names)

    _run(model, calibration, replaced or {}, hooks, progress, before_item=before_item)
    check_paired()
    for value in stats.values():
        if value.hessian is not None:
            value.row_counts = None
        if value.unpaired:  # reason: a cross-covariance over only some of the calls would skew the fit's target
            value.cross = None
    return {name: value for name, value in stats.items() if value.hessian is not None or value.row_counts is not None}
