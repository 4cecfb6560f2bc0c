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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._model import INPUT_ITEM, model_device, run_inputs, training_mode
from .._progress import progress_bar
from ..errors import RPQConversionError
from ..record import LayerPlan

__all__ = ["LayerStats", "collect_stats", "call_groups", "drop_padding", "padding_mask", "weight_layers",
           "StopForward"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MIN_ENERGY = 0.01  # of the median: an input row weighs at most 100x a typical one (robust to massive rows)


@dataclass
class LayerStats:
    """Input statistics of one weight, summed over every call of every layer that reads it."""

    hessian: Tensor | None = None  # [row length, row length], float32 (float64 for float64 inputs)
    row_counts: Tensor | None = None  # [rows], float64
    cross: Tensor | None = None  # [row length, row length], as hessian: Σ x_dense xᵀ, weighted as hessian
    unpaired: bool = False  # the dense model's calls and these did not pair up one to one (control flow differed)
    non_finite_item: int | None = None  # the first calibration item that gave this layer a NaN or infinite input

    def add_inputs(self, x: Tensor, energy: Tensor, dense: Tensor | None = None) -> None:
        """Add input rows ``x [M, row length]`` weighted by one over their dense outputs' energy ``[M]``;
        ``dense``: the rows the dense model gives the layer on the same item, for ``cross``."""
        # reason: float32 sums, added in place: a float64 H and its update held 4x a square float32 layer, and the fit
        # computes in float32 anyway (over 50-400 items the sums stay within 2e-6 of float64's: test_fit_calibrate)
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.detach().to(dtype)
        energy = energy.detach().double()
        # reason: a row whose output is (almost) zero would otherwise weigh without bound
        weight = 1 / energy.clamp_min(_MIN_ENERGY * energy.median()).clamp_min(torch.finfo(torch.float64).tiny)
        weighted = x.t() * weight.to(dtype)
        self.hessian = weighted @ x if self.hessian is None else self.hessian.addmm_(weighted, x)
        if dense is not None:
            weighted = dense.detach().to(dtype).t() * weight.to(dtype)
            self.cross = weighted @ x if self.cross is None else self.cross.addmm_(weighted, x)

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


def _input_rows(layer: nn.Module, plan: LayerPlan):
    """A function of a forward pre-hook's ``(module, args, kwargs)`` and the item's non-padding positions
    ``keep`` giving the layer's input rows and the energy of each one's dense output, or None for a layer
    kind with no such statistic."""
    if isinstance(layer, _CONV):
        return lambda module, args, kwargs, keep: _conv_inputs(module, kwargs.get("input", args[0]))
    if isinstance(layer, nn.Linear):
        return lambda module, args, kwargs, keep: _linear_inputs(kwargs.get("input", args[0] if args else None),
                                                                 module.weight, keep)
    if plan.transposed and type(layer).__name__ == "Conv1D":  # GPT-2's Conv1D: weight [in, out]
        return lambda module, args, kwargs, keep: _linear_inputs(args[0] if args else kwargs.get("x"),
                                                                 module.weight.t(), keep)
    return None


def _observable(layer: nn.Module, plan: LayerPlan) -> bool:
    """Whether a hook on ``layer`` can record statistics of ``plan``'s weight."""
    return isinstance(layer, (nn.Embedding, nn.EmbeddingBag)) or _input_rows(layer, plan) is not None


class _Recorder:
    """The forward pre-hooks of :func:`collect_stats` and the state they share over a run: the
    current item's index and non-padding positions ``keep [batch, length]`` (or None), the plans not
    yet called on it (``pending``) and, while the dense model runs on the item first (asymmetric),
    the rows each layer gets there (``dense``), paired call by call with the next pass's for ``cross``."""

    def __init__(self, stats: dict[str, LayerStats], names: set[str], stop_early: bool):
        self.stats, self.names, self.stop_early = stats, names, stop_early
        self.item = -1
        self.keep: Tensor | None = None
        self.pending: set[str] = set()
        self.dense: dict[str, list] | None = None
        self.recording = False

    def hook(self, layer: nn.Module, plan: LayerPlan):
        """A forward pre-hook adding each call's input to ``plan``'s statistics, or None for a layer kind
        with no such statistic; it ends the forward (:class:`StopForward`) once every plan has been called,
        with ``stop_early``."""
        if isinstance(layer, (nn.Embedding, nn.EmbeddingBag)):
            def observe(module, args, kwargs):
                indices = kwargs.get("input", args[0] if args else None)
                self.stats[plan.name].add_lookups(drop_padding(indices, self.keep, features=False), plan.shape[0])
        else:
            rows = _input_rows(layer, plan)
            if rows is None:
                return None

            def observe(module, args, kwargs):
                self._add_inputs(plan.name, *rows(module, args, kwargs, self.keep))

        def hook(module, args, kwargs):
            observe(module, args, kwargs)
            self.pending.discard(plan.name)
            if self.stop_early and not self.pending:
                raise StopForward
        return hook

    def _add_inputs(self, name: str, x: Tensor, energy: Tensor) -> None:
        stats = self.stats[name]
        if stats.non_finite_item is None and not torch.isfinite(energy.sum()):
            stats.non_finite_item = self.item
        if self.recording:
            self.dense.setdefault(name, []).append((x, energy))
        elif self.dense is not None:
            records = self.dense.get(name)
            if records and records[0][0].shape == x.shape:
                dense, dense_energy = records.pop(0)
                stats.add_inputs(x, dense_energy, dense)
            else:
                stats.unpaired = True
                stats.add_inputs(x, energy)
        else:
            stats.add_inputs(x, energy)

    def start_item(self, inputs, dense_pass=None) -> None:
        """Get ready for the next item; ``dense_pass()`` (asymmetric) runs the dense model on it, recording."""
        self.item += 1
        self.pending.update(self.names)
        self.keep = padding_mask(inputs)
        if dense_pass is not None:
            self.check_paired()
            self.dense, self.recording = {}, True
            dense_pass()
            self.recording = False
            self.pending.update(self.names)

    def check_paired(self) -> None:
        """Mark the statistics of every layer whose dense calls on the last item were not all paired."""
        for name, records in (self.dense or {}).items():
            self.stats[name].unpaired |= bool(records)


def padding_mask(inputs) -> Tensor | None:
    """The non-padding positions of a keyword calibration item (any Mapping: a dict, a tokenizer's
    BatchEncoding; its ``attention_mask``), else None."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def weight_layers(model: nn.Module, plan: LayerPlan):
    """The layers of ``model`` that read ``plan``'s weight as their own ``weight``."""
    for alias in plan.aliases:
        owner, _, attribute = alias.rpartition(".")
        if attribute == "weight":
            yield model.get_submodule(owner)


class StopForward(Exception):
    """Raised by a hook once every layer of interest has seen the current item: the rest of the forward is skipped."""


def _describe(inputs) -> str:
    """A calibration item in a few words, for an error message."""
    if isinstance(inputs, Tensor):
        return f"Tensor {list(inputs.shape)}"
    if isinstance(inputs, (tuple, list, Mapping)):
        return f"{type(inputs).__name__} of {len(inputs)}"
    return type(inputs).__name__


def _innermost(model: nn.Module) -> tuple[list[str], list]:
    """The names of the modules a forward of ``model`` is inside, innermost last, and the hook handles
    that keep it: a module leaves it when it returns, so after an exception its last name is the
    module that raised."""
    inside: list[str] = []

    def leave(module, args, output) -> None:  # reason: a forward hook's return value would replace the output
        inside.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: inside.append(name)))
        handles.append(module.register_forward_hook(leave))
    return inside, handles


def _run(model: nn.Module, calibration: Iterable, replaced: dict[str, Tensor], hooks: list, progress: bool,
         before_item=lambda inputs, forward: None) -> None:
    """Run ``model`` in eval mode without grad on every calibration item, with ``hooks``
    (``(layer, pre-hook)``) attached and the parameters in ``replaced`` swapped in
    (``torch.func.functional_call``), leaving its modes and tensors as they were. A hook may
    raise :class:`StopForward` to end the item's forward early. ``before_item(inputs, forward)`` runs
    first on each item; ``forward(replaced)`` runs the model on it. An item the model cannot take
    raises :class:`RPQConversionError` naming it and, where one raised, the layer."""
    inside, tracking = _innermost(model)  # reason: first, so a layer is entered before its own hooks can raise
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer, hook in hooks]
    device = model_device(model)
    try:
        with training_mode(model, False), torch.no_grad():
            for index, inputs in enumerate(progress_bar(calibration, desc="rpq_fx calibration", unit="batch",
                                                        delay=2, enabled=progress)):
                def forward(swapped: dict[str, Tensor]) -> None:
                    inside.clear()
                    try:
                        run_inputs(model, inputs, device, swapped)
                    except StopForward:
                        pass
                    except RPQConversionError:
                        raise
                    except Exception as error:
                        layer = f", in layer '{inside[-1]}' ({type(model.get_submodule(inside[-1])).__name__})" \
                            if inside and inside[-1] else ""
                        raise RPQConversionError(
                            f"convert: calibration item {index} ({_describe(inputs)}) failed in the model's forward"
                            f"{layer}: {type(error).__name__}: {error}; each item must be what the model takes: "
                            f"{INPUT_ITEM}") from error

                before_item(inputs, forward)
                forward(replaced)
    finally:
        for handle in handles + tracking:
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
            # reason: the last input itself is held, not its address: a freed input's memory handed out again
            # as the next layer's input must not pass for the same tensor and join two groups
            same = isinstance(x, Tensor) and isinstance(last[0], Tensor) and x.data_ptr() == last[0].data_ptr()
            if not same or not groups:
                groups.append([])
            groups[-1].append(plan)
            last[0] = x
        return hook

    hooks = [(layer, watcher(plan)) for plan in plans if plan.converted
             for layer in weight_layers(model, plan) if _observable(layer, plan)]
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
    names = {plan.name for plan in plans if plan.converted}
    stats = {name: LayerStats() for name in names}
    recorder = _Recorder(stats, names, stop_early)
    hooks = [(layer, hook) for plan in plans if plan.converted for layer in weight_layers(model, plan)
             if (hook := recorder.hook(layer, plan)) is not None]
    dense = asymmetric and bool(replaced)

    def before_item(inputs, forward):
        recorder.start_item(inputs, (lambda: forward({})) if dense else None)

    _run(model, calibration, replaced or {}, hooks, progress, before_item=before_item)
    recorder.check_paired()
    for value in stats.values():
        if value.hessian is not None:
            value.row_counts = None
        if value.unpaired:  # reason: a cross-covariance over only some of the calls would skew the fit's target
            value.cross = None
    return {name: value for name, value in stats.items() if value.hessian is not None or value.row_counts is not None}
