"""Data-aware k-means fits of a model bigger than memory, one block at a time (GPTQ's sequential order).

The model is the architecture on the meta device; its dense tensors are read by name when needed.
Everything outside the blocks (embeddings, final norm, head) is materialised for the whole fit; of
the blocks (the model's one ``nn.ModuleList``) only the one being fitted. The model itself runs each
calibration item, its blocks swapped for stand-ins: the blocks already fitted replay the hidden
states the last of them gave (stored per item), the block being fitted runs, the blocks after it
end the forward. Hidden states are carried twice where a layer fits asymmetrically: as the
already-quantised blocks give them and as the dense model gives them (the asymmetric target's
input). Each layer is then fitted exactly as :func:`rpq_fx.fit.fit_weights` fits it in the whole
model: the same groups, order, statistics and seeds (``tests/fit/test_fit_sequential.py``).
"""

import copy
import ctypes
import dataclasses
import logging
from collections.abc import Callable, Sequence
from itertools import chain

import torch
from torch import Tensor, nn

from .._model import as_args, input_items, model_device, run_inputs, training_mode
from .._progress import progress_bar
from ..errors import RPQConversionError
from ..nn.weight import RPQWeight
from ..record import FitOutcome, LayerPlan
from . import _fit
from .calibrate import _Enough, call_groups, collect_stats

__all__ = ["fit_sequential", "find_blocks", "materialise"]

_log = logging.getLogger(__name__)  # one line per block fitted: progress where no terminal shows the bar

try:  # reason: glibc's malloc_trim; other C libraries (macOS, musl, Windows) keep their allocator as it is
    _TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError, TypeError):
    _TRIM = None

_FLAG = "rpq_quantised"  # the stage's buffer saying which stream the stand-ins replay (swapped by functional_call)


def find_blocks(model: nn.Module) -> str:
    """The name of ``model``'s blocks: of its ``nn.ModuleList``s whose every item holds parameters,
    the one holding the most (``model.layers`` of a Llama, ``transformer.h`` of a GPT-2, ``encoder.layer``
    of a BERT, ``blocks`` of a timm ViT)."""
    lists = [(sum(p.numel() for p in m.parameters()), -name.count("."), name)
             for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
             and all(any(True for _ in block.parameters()) for block in m)]
    if not lists:
        raise RPQConversionError(
            f"fit_sequential: {type(model).__name__} has no nn.ModuleList of blocks; the block-by-block fit needs "
            "the model's blocks in one nn.ModuleList, called in order, each block's output the next one's hidden "
            "states (Llama, Mistral, Qwen2, GPT-2, BERT, ViT); convert a model that fits in memory with "
            "rpq_fx.convert(..., calibration=...) instead")
    return max(lists)[2]


def materialise(module: nn.Module, read: Callable[[str], Tensor], names: set[str], prefix: str = "",
                skip: Callable[[str], bool] = lambda name: False) -> None:
    """Give every meta parameter and buffer of ``module`` (but those ``skip(name)`` names) its value,
    ``read(prefix + name)``; one shared by several names is read once; a tensor that holds values
    already (a buffer the model computes) stays as it is."""
    values: dict[int, Tensor] = {}
    for name, tensor in chain(module.named_parameters(remove_duplicate=False),
                              module.named_buffers(remove_duplicate=False)):
        if not tensor.is_meta or skip(name):
            continue
        if id(tensor) not in values:
            key = prefix + name
            if key not in names:
                raise RPQConversionError(
                    f"'{key}' is on the meta device and not in the checkpoint; a buffer the model computes (rotary "
                    "frequencies, position ids) must hold values: build the model with only its parameters on meta "
                    "(accelerate.init_empty_weights())")
            value = read(key)
            values[id(tensor)] = nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                else value
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = values[id(tensor)]


class _StandIn(nn.Module):
    """Takes block ``index``'s place: replays the hidden states the stage holds (``replay``) or ends the
    forward. It keeps the block's plain attributes (``attention_type``, ...) for code that reads them."""

    def __init__(self, block: nn.Module, stage: "_Stage", replay: bool):
        super().__init__()
        for name, value in vars(block).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        object.__setattr__(self, "_rpq_stage", stage)  # reason: not a submodule (the stage holds the model)
        self._rpq_replay = replay

    def forward(self, *args, **kwargs):
        if not self._rpq_replay:
            raise _Enough
        return self._rpq_stage.replayed()


class _Stage(nn.Module):
    """The model as one stage of the fit sees it: called with an item's index (and its attention mask,
    for the statistics to leave padding out), it runs the model on calibration item ``index``.
    It holds the model's children, so its parameter names are the model's."""

    def __init__(self, model: nn.Module, items: Sequence, blocks: str):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        # reason: plain attributes, not submodules (their names would prefix the model's), named apart from its children
        object.__setattr__(self, "_rpq_model", model)
        object.__setattr__(self, "_rpq_blocks", model.get_submodule(blocks))
        self._rpq_items, self._rpq_index = items, 0
        self._rpq_stored: dict[bool, list] = {False: [], True: []}  # the last fitted block's outputs, per stream
        self.register_buffer(_FLAG, torch.tensor(False))
        model.eval()

    def replayed(self):
        stream = self._rpq_stored[bool(getattr(self, _FLAG))] or self._rpq_stored[True]
        return stream[self._rpq_index]

    def forward(self, rpq_index: int, attention_mask=None):
        self._rpq_index = rpq_index
        args, kwargs = as_args(self._rpq_items[rpq_index])
        return self._rpq_model(*args, **kwargs)


def _stage_items(items: Sequence) -> list:
    """What the stage is called with per calibration item: its index, and its 2-D attention mask (the
    statistics leave padding positions out, as in the whole model)."""
    out = []
    for i, item in enumerate(items):
        mask = item.get("attention_mask") if isinstance(item, dict) else None
        out.append({"rpq_index": i, "attention_mask": mask} if isinstance(mask, Tensor) and mask.dim() == 2 else (i,))
    return out


def _owners(plans: list[LayerPlan], blocks: str) -> dict[str, int | None]:
    """Which block each plan's weight is in (None: outside the blocks); a weight shared across blocks is refused."""
    owners, prefix = {}, f"{blocks}."
    for plan in plans:
        places = {int(alias[len(prefix):].partition(".")[0]) if alias.startswith(prefix) else None
                  for alias in plan.aliases}
        if len(places) > 1:
            raise RPQConversionError(f"fit_sequential: '{plan.name}' is shared by {sorted(plan.aliases)}, across "
                                     f"blocks of '{blocks}'; the block-by-block fit needs each block's weights its own")
        owners[plan.name] = places.pop()
    return owners


def fit_sequential(model: nn.Module, plans: list[LayerPlan], weights: dict[str, RPQWeight], calibration, *,
                   read: Callable[[str], Tensor], names: set[str], seeds: dict[str, int],
                   progress: bool = True) -> dict[str, FitOutcome]:
    """Fit the weights of ``seeds`` (plan name -> seed) data-aware on ``calibration``, block by block, and
    say how each was fitted (by plan name). ``model``: the architecture, on the meta device (not modified);
    ``read(name)``: a dense tensor of it by name, one of ``names``; ``weights``: the RPQ weights to fill.

    Memory: the layers outside the blocks, one block, and the hidden states of the calibration items
    (twice where a layer fits asymmetrically). Differences from the whole-model fit: a weight shared by
    a layer before the blocks and one after them (a tied ``lm_head``) is fitted before the blocks, on
    the first layer's statistics only.
    """
    items = input_items(calibration, "calibration")
    if not items:
        raise ValueError("fit_sequential: calibration= holds no items (an empty sequence, or an iterator already "
                         "used up); pass example inputs, or calibration=None for a plain k-means fit")
    blocks = find_blocks(model)
    shell = copy.deepcopy(model)
    originals = list(shell.get_submodule(blocks))
    todo = [plan for plan in plans if plan.name in seeds]
    owners = _owners(todo, blocks)
    materialise(shell, read, names, skip=lambda name: name.startswith(f"{blocks}."))
    stage = _Stage(shell, items, blocks)
    stage_items = _stage_items(items)
    carry_dense = any(plan.settings.asymmetric for plan in todo)
    fits: dict[str, FitOutcome] = {}
    replaced: dict[str, Tensor] = {}  # the fitted weights the quantised stream runs with (this stage's)
    flag = {_FLAG: torch.tensor(True)}

    def fit_stage(stage_plans: list[LayerPlan], bar) -> None:
        if not stage_plans:
            return
        groups, once = call_groups(stage, stage_plans, stage_items[0])
        for group in groups:
            early = all(plan.name in once for plan in group)
            asymmetric = any(plan.settings.asymmetric for plan in group)
            swapped = {**replaced, **flag} if fits_calibrated[0] and carry_dense else dict(replaced)
            stats = collect_stats(stage, group, stage_items, replaced=swapped, stop_early=early,
                                  asymmetric=asymmetric, progress=False)
            for plan in group:
                bar.set_postfix_str(plan.name, refresh=False)
                dense = stage.get_parameter(plan.name)
                fits[plan.name] = _fit(_with_param(plan, dense), weights[plan.name], stats.pop(plan.name, None),
                                       seeds[plan.name])
                with torch.no_grad():
                    replaced.update(dict.fromkeys(plan.aliases, weights[plan.name]()))
                fits_calibrated[0] += 1
                bar.update()

    def carry(block: nn.Module) -> None:
        """Run each item through ``block`` in both streams and keep its outputs as the next stage's inputs."""
        outputs: dict[bool, list] = {False: [], True: []}
        streams = (True, False) if carry_dense and fits_calibrated[0] else (True,)
        current = [True]

        def keep(module, args, output):
            outputs[current[0]].append(output)
            raise _Enough  # reason: the rest of the model is not needed (the head after the last block)

        handle = block.register_forward_hook(keep)
        try:
            with training_mode(stage, False), torch.no_grad():
                for quantised in streams:
                    current[0] = quantised
                    swapped = {**replaced, **flag} if quantised else {}
                    for item in stage_items:
                        try:
                            run_inputs(stage, item, model_device(stage), swapped)
                        except _Enough:
                            pass
        finally:
            handle.remove()
        stage._rpq_stored = outputs

    fits_calibrated = [0]
    stand_ins = [(_StandIn(block, stage, replay=True), _StandIn(block, stage, replay=False)) for block in originals]
    container = stage._rpq_blocks
    with progress_bar(total=len(todo), desc="rpq_fx fit", unit="layer", delay=2, enabled=progress) as bar:
        for i in range(len(originals)):
            container[i] = stand_ins[i][1]
        fit_stage([plan for plan in todo if owners[plan.name] is None], bar)  # the layers before the blocks
        head = dict(replaced)
        for i, block in enumerate(originals):
            materialise(block, read, names, prefix=f"{blocks}.{i}.")
            container[i] = block
            fit_stage([plan for plan in todo if owners[plan.name] == i and plan.name not in fits], bar)
            carry(block)
            container[i] = stand_ins[i][0]
            block.to_empty(device="meta")  # frees its dense tensors
            replaced.clear()
            replaced.update(head)
            _give_back()
            _log.info("fit_sequential: block %d of %d fitted (%d of %d layers)", i + 1, len(originals), len(fits),
                      len(todo))
        rest = [plan for plan in todo if owners[plan.name] is None and plan.name not in fits]
        fit_stage(rest, bar)  # the layers after the blocks
        for plan in todo:  # reason: layers no hook observes get a plain k-means fit, as in the whole model
            if plan.name not in fits:
                fits[plan.name] = _fit(_with_param(plan, read(_stored_name(plan, names))), weights[plan.name], None,
                                       seeds[plan.name])
                bar.update()
    return fits


def _give_back() -> None:
    """Return the memory the last block freed to the system: glibc keeps freed blocks under its mmap
    threshold (which it raises as big blocks are freed) in its heap, resident and fragmented."""
    if _TRIM is not None:
        _TRIM(0)


def _with_param(plan: LayerPlan, param: Tensor) -> LayerPlan:
    return dataclasses.replace(plan, param=param)


def _stored_name(plan: LayerPlan, names: set[str]) -> str:
    return next(alias for alias in plan.aliases if alias in names)
