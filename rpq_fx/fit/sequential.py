"""Data-aware k-means fits one block at a time (GPTQ's sequential order), of a model bigger than memory
(:func:`fit_sequential`) or in memory (:func:`fit_blocks`, what ``convert`` runs where :func:`block_split`
finds that the model's blocks chain: each block then runs once per group of its layers, not the model).

For :func:`fit_sequential` the model is the architecture on the meta device; its dense tensors are read
by name when needed. Everything outside the blocks (embeddings, final norm, head) is materialised for the
whole fit; of the blocks (the model's one ``nn.ModuleList``) only the one being fitted. The model itself runs each
calibration item, its blocks swapped for stand-ins: the blocks already fitted replay the hidden
states the last of them gave (stored per item), the block being fitted runs, the blocks after it
end the forward. Hidden states are carried twice where a layer fits asymmetrically: as the
already-quantised blocks give them and as the dense model gives them (the asymmetric target's
input). Each layer is then fitted exactly as :func:`rpq_fx.fit.fit_weights` fits it running the whole
model: the same groups, order, statistics and seeds (``tests/fit/test_fit_sequential.py``,
``tests/fit/test_fit_blocks.py``). :class:`BlockReplay` runs a model from one block on the same way
(``allocate``'s costs).
"""

import copy
import ctypes
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from itertools import chain

import torch
from torch import Tensor, nn

from .._model import as_args, input_items, model_device, run_inputs, training_mode
from .._progress import progress_bar
from ..errors import RPQConversionError
from ..nn.weight import RPQWeight
from ..record import FitOutcome, LayerPlan
from .calibrate import StopForward, call_groups, collect_stats, weight_layers
from .layer import fit_layer

__all__ = ["fit_sequential", "fit_blocks", "block_split", "BlockReplay", "find_blocks", "materialise"]

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
            raise StopForward
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
        mask = item.get("attention_mask") if isinstance(item, Mapping) else None
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
    todo = [plan for plan in plans if plan.name in seeds]
    owners = _owners(todo, blocks)  # reason: before reading anything, a weight shared across blocks is refused
    materialise(shell, read, names, skip=lambda name: name.startswith(f"{blocks}."))

    def load(index: int, block: nn.Module) -> None:
        materialise(block, read, names, prefix=f"{blocks}.{index}.")

    def unload(block: nn.Module) -> None:
        block.to_empty(device="meta")  # frees its dense tensors
        _give_back()

    return fit_blocks(shell, blocks, todo, weights, items, seeds, fit_layer, progress=progress, load=load,
                      unload=unload, dense=lambda plan: read(_stored_name(plan, names)))


def fit_blocks(model: nn.Module, blocks: str, plans: list[LayerPlan], weights: dict[str, RPQWeight], items: Sequence,
               seeds: dict[str, int], fit: Callable, *, progress: bool = True,
               load: Callable[[int, nn.Module], None] = lambda index, block: None,
               unload: Callable[[nn.Module], None] = lambda block: None,
               dense: Callable[[LayerPlan], Tensor] | None = None) -> dict[str, FitOutcome]:
    """Fit ``plans`` data-aware on calibration ``items`` block by block (``model.<blocks>``), each with
    ``fit(plan, weight, stats, seed)``, and say how each was fitted (by plan name): each block's
    statistics come from running that block alone on the hidden states the blocks before it gave
    (kept per item), not the model from its input. ``load(index, block)`` / ``unload(block)`` give a
    block its tensors before its fit and take them after; ``dense(plan)`` is a layer's dense weight
    (default: the plan's own). The model's blocks and modes are as they were after.
    """
    owners = _owners(plans, blocks)
    dense_weight = dense or (lambda plan: plan.param)
    stage_items = _stage_items(items)
    carry_dense = any(plan.settings.asymmetric for plan in plans)
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
                fits[plan.name] = fit(_with_param(plan, dense), weights[plan.name], stats.pop(plan.name, None),
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
            raise StopForward  # reason: the rest of the model is not needed (the head after the last block)

        handle = block.register_forward_hook(keep)
        try:
            with training_mode(stage, False), torch.no_grad():
                for quantised in streams:
                    current[0] = quantised
                    swapped = {**replaced, **flag} if quantised else {}
                    for item in stage_items:
                        try:
                            run_inputs(stage, item, model_device(stage), swapped)
                        except StopForward:
                            pass
        finally:
            handle.remove()
        stage._rpq_stored = outputs

    fits_calibrated = [0]
    with training_mode(model, False):
        stage = _Stage(model, items, blocks)
        container = stage._rpq_blocks
        originals = list(container)
        stand_ins = [(_StandIn(block, stage, replay=True), _StandIn(block, stage, replay=False))
                     for block in originals]
        try:
            with progress_bar(total=len(plans), desc="rpq_fx fit", unit="layer", delay=2, enabled=progress) as bar:
                for i in range(len(originals)):
                    container[i] = stand_ins[i][1]
                fit_stage([plan for plan in plans if owners[plan.name] is None], bar)  # the layers before the blocks
                head = dict(replaced)
                for i, block in enumerate(originals):
                    load(i, block)
                    container[i] = block
                    fit_stage([plan for plan in plans if owners[plan.name] == i and plan.name not in fits], bar)
                    carry(block)
                    container[i] = stand_ins[i][0]
                    unload(block)
                    replaced.clear()
                    replaced.update(head)
                    _log.info("fit_sequential: block %d of %d fitted (%d of %d layers)", i + 1, len(originals),
                              len(fits), len(plans))
                rest = [plan for plan in plans if owners[plan.name] is None and plan.name not in fits]
                fit_stage(rest, bar)  # the layers after the blocks
                for plan in plans:  # reason: layers no hook observes get a plain k-means fit, as in the whole model
                    if plan.name not in fits:
                        fits[plan.name] = fit(_with_param(plan, dense_weight(plan)), weights[plan.name], None,
                                              seeds[plan.name])
                        bar.update()
        finally:
            for i, block in enumerate(originals):  # reason: the stand-ins took the model's own blocks' places
                container[i] = block
    return fits


def block_split(model: nn.Module, item, plans: Sequence[LayerPlan] = ()) -> str | None:
    """The name of ``model``'s blocks (:func:`find_blocks`) where running the model block by block, each
    block on the hidden states the one before it gave, is running it whole: on calibration ``item``
    each block is called once, in order; the model's output is the same when every block replays the
    last one's output (nothing after the blocks reads an earlier block's output); and each of ``plans``
    outside the blocks is called only before the first block or only after the last one (not between
    blocks, not both: a tied ``lm_head``), none shared across blocks. Else None (run the model whole)."""
    try:
        blocks = find_blocks(model)
        owners = _owners(list(plans), blocks)
    except RPQConversionError:
        return None
    container = model.get_submodule(blocks)
    originals = list(container)
    events: list[tuple] = []
    handles = []
    for i, block in enumerate(originals):
        handles.append(block.register_forward_pre_hook(lambda module, args, i=i: events.append(("enter", i))))
        handles.append(block.register_forward_hook(lambda module, args, out, i=i: events.append(("exit", i, out))))
    outside = [plan for plan in plans if owners[plan.name] is None]
    for plan in outside:
        for layer in weight_layers(model, plan):
            handles.append(layer.register_forward_pre_hook(lambda module, args, name=plan.name: events.append(
                ("layer", name))))
    device = model_device(model)
    with training_mode(model, False), torch.no_grad():
        try:
            want = run_inputs(model, item, device)
        except Exception:  # reason: the whole-model fit runs the item again and names it and the layer in its error
            return None
        finally:
            for handle in handles:
                handle.remove()
        blockwise = [event[:2] for event in events if event[0] != "layer"]
        if blockwise != [(kind, i) for i in range(len(originals)) for kind in ("enter", "exit")]:
            return None
        first = events.index(("enter", 0))
        last = max(j for j, event in enumerate(events) if event[0] == "exit")
        for plan in outside:
            at = [j for j, event in enumerate(events) if event == ("layer", plan.name)]
            if not (all(j < first for j in at) or all(j > last for j in at)):
                return None
        stage = _Stage(model, [item], blocks)
        stage._rpq_stored = {False: [], True: [events[last][2]]}
        try:
            for i, block in enumerate(originals):
                container[i] = _StandIn(block, stage, replay=True)
            got = run_inputs(stage, _stage_items([item])[0], device)
        except Exception:  # reason: a model the stand-ins cannot run is one to run whole (it raises its own errors)
            return None
        finally:
            for i, block in enumerate(originals):
                container[i] = block
    return blocks if _same(got, want) else None


class BlockReplay:
    """Run ``model`` on calibration ``items`` from block ``start`` on (``model.<blocks>``, :func:`block_split`):
    the blocks before it replay the outputs block ``start - 1`` gave on each item, kept, so a weight
    in block ``start`` or after it changes the output of a run of those blocks alone, not of the whole
    model. :meth:`advance` runs block ``start`` on what it is given and keeps its outputs instead (one
    block's outputs per item are held). A context manager: the model's blocks are put back on exit."""

    def __init__(self, model: nn.Module, blocks: str, items: Sequence):
        self.stage = _Stage(model, items, blocks)  # reason: in eval mode; the caller keeps the modes (training_mode)
        self.items = _stage_items(items)
        self.originals = list(self.stage._rpq_blocks)
        self.device = model_device(model)
        self.start = 0

    def __enter__(self) -> "BlockReplay":
        return self

    def __exit__(self, *error) -> None:
        for i, block in enumerate(self.originals):
            self.stage._rpq_blocks[i] = block

    def run(self, index: int, replaced: dict[str, Tensor] | None = None):
        """The model's output on item ``index``, the parameters ``replaced`` names (by the model's names) swapped in."""
        return run_inputs(self.stage, self.items[index], self.device, replaced)

    def advance(self) -> None:
        """Keep block ``start``'s outputs on every item (the dense model's) and replay them from now on."""
        block, outputs = self.originals[self.start], []

        def keep(module, args, output):
            outputs.append(output)
            raise StopForward  # reason: the rest of the model is not needed

        handle = block.register_forward_hook(keep)
        try:
            for item in self.items:
                try:
                    run_inputs(self.stage, item, self.device)
                except StopForward:
                    pass
        finally:
            handle.remove()
        self.stage._rpq_stored = {False: [], True: outputs}
        self.stage._rpq_blocks[self.start] = _StandIn(block, self.stage, replay=True)
        self.start += 1


def _same(got, want) -> bool:
    """Whether two model outputs (tensors, or sequences and mappings of them) hold the same values, to rounding;
    other objects are not compared (a key-value cache: the stand-ins add nothing to it, and no later layer reads it)."""
    if isinstance(want, Tensor):
        return isinstance(got, Tensor) and got.shape == want.shape and bool(torch.allclose(
            got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()) if want.numel() else 0.0, equal_nan=True))
    if isinstance(want, Mapping):
        return isinstance(got, Mapping) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(_same, got, want))
    return True


def _give_back() -> None:
    """Return the memory the last block freed to the system: glibc keeps freed blocks under its mmap
    threshold (which it raises as big blocks are freed) in its heap, resident and fragmented."""
    if _TRIM is not None:
        _TRIM(0)


def _with_param(plan: LayerPlan, param: Tensor) -> LayerPlan:
    return dataclasses.replace(plan, param=param)


def _stored_name(plan: LayerPlan, names: set[str]) -> str:
    return next(alias for alias in plan.aliases if alias in names)
