"""``convert_checkpoint``: convert a model bigger than memory, weight by weight, from its dense checkpoint.

The model is built on the meta device (its architecture, nothing allocated); its dense weights stay
on disk, in one safetensors file or a sharded folder with ``model.safetensors.index.json`` (as
Hugging Face models ship). Each weight is read when its fit needs it and freed after it, and the
result is written as the RPQ checkpoint :func:`rpq_fx.load` reads: the same tensors, bit for bit, and
the same record as ``rpq_fx.save(rpq_fx.convert(model_with_weights, ...))`` with the same settings and
seed (safetensors writes its metadata map in no fixed order, so the bytes of two saves differ).
With ``calibration`` the k-means fit is data-aware and runs block by block
(:mod:`rpq_fx.fit.sequential`): one block of the model materialised at a time.
"""

import dataclasses
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._progress import progress_bar
from .config import RPQConfig, dtype_name
from .convert import convert
from .errors import RPQConversionError
from .fit import fit_weights
from .fit.sequential import fit_sequential, materialise
from .io import SAFETENSORS_DTYPES, RPQCheckpointError, read_header, save
from .nn.weight import RPQWeight
from .passes import LayerPlan, new_weights
from .record import ConversionRecord, FitOutcome, attach_record, conversion_record

__all__ = ["convert_checkpoint", "DenseCheckpoint", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
_SINGLE_NAME = "model.safetensors"
_MAX_INDEX = 64 * 1024 * 1024  # bytes: a 70B model's index is ~100 KiB


@dataclass(frozen=True)
class _Entry:
    file: Path
    offset: int  # of the tensor's first byte in the file
    shape: tuple[int, ...]
    dtype: torch.dtype


class DenseCheckpoint:
    """A dense safetensors checkpoint, one file or a sharded folder, every name, shape, dtype and
    offset checked when opened; :meth:`read` reads one tensor (and nothing else) into memory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, _Entry] = {}
        for file, names in self._shards():
            header, _ = read_header(file)
            if names is not None and set(header) != names:
                extra, missing = sorted(set(header) - names), sorted(names - set(header))
                raise RPQCheckpointError(
                    f"{file}: its tensors are not the ones {INDEX_NAME} maps to it: "
                    f"{_listing(missing)} missing, {_listing(extra)} not mapped to it")
            with open(file, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
            for name, entry in header.items():
                self.entries[name] = _Entry(file, start + entry["data_offsets"][0], tuple(entry["shape"]),
                                            SAFETENSORS_DTYPES[entry["dtype"]])

    def _shards(self) -> list[tuple[Path, set[str] | None]]:
        """Each file to read and, for a sharded folder, the tensor names its index maps to it."""
        if self.path.is_file():
            return [(self.path, None)]
        if not self.path.is_dir():
            raise FileNotFoundError(f"convert_checkpoint: no such checkpoint file or folder: {self.path}")
        index = self.path / INDEX_NAME
        if not index.exists():
            if (self.path / _SINGLE_NAME).is_file():
                return [(self.path / _SINGLE_NAME, None)]
            raise FileNotFoundError(f"convert_checkpoint: {self.path} holds neither {INDEX_NAME} (a sharded "
                                    f"checkpoint) nor {_SINGLE_NAME}")
        if not stat.S_ISREG(index.stat().st_mode) or index.stat().st_size > _MAX_INDEX:
            raise RPQCheckpointError(f"{index}: not a regular file of at most {_MAX_INDEX} bytes")
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError) as error:
            raise RPQCheckpointError(f"{index}: damaged index ({type(error).__name__}: {str(error)[:80]})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise RPQCheckpointError(f"{index}: damaged or crafted index: 'weight_map' must be a non-empty object "
                                     f"of tensor name -> shard file, got {_short(weight_map)}")
        shards: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            # reason: a shard name is joined to the folder; a path or '..' would read a file elsewhere
            if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\0" in shard:
                raise RPQCheckpointError(f"{index}: damaged or crafted index: tensor {_short(name)} maps to "
                                         f"{_short(shard)}; a shard must be a file name in {self.path}")
            shards.setdefault(shard, set()).add(name)
        missing = [shard for shard in shards if not (self.path / shard).is_file()]
        if missing:
            raise FileNotFoundError(f"convert_checkpoint: {index} names shards that are not in {self.path}: "
                                    f"{_listing(missing)}")
        return [(self.path / shard, names) for shard, names in shards.items()]

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from its file into memory of its own (no memory map: its pages would
        count in this process's resident memory until the whole file is closed)."""
        entry = self.entries[name]
        tensor = torch.empty(entry.shape, dtype=entry.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            with open(entry.file, "rb") as f:
                f.seek(entry.offset)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != nbytes:
                    raise RPQCheckpointError(f"{entry.file}: truncated while reading '{name}' (changed while open?)")
        return tensor


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return (shown + f" and {len(names) - most} more" if len(names) > most else shown) or "none"


def _check_model(model: nn.Module, dense: DenseCheckpoint) -> None:
    """The meta model's parameters and persistent buffers against the checkpoint's tensors: every
    parameter present (under one of its names), nothing unknown, every shape and dtype equal."""
    on_device = next((name for name, p in model.named_parameters() if not p.is_meta), None)
    if on_device is not None:
        raise ValueError(f"convert_checkpoint: the model must be built on the meta device (architecture only), "
                         f"but '{on_device}' holds values; build it under `with torch.device('meta'):`, or use "
                         "rpq_fx.convert for a model in memory")
    computed = next((name for name, b in model.named_buffers() if b.is_meta and name not in dense.entries), None)
    if computed is not None:  # reason: found now, not after hours of fitting, when the result is assembled
        raise RPQConversionError(
            f"'{computed}' is on the meta device and not in the checkpoint; a buffer the model computes (rotary "
            "frequencies, position ids) must hold values: build the model with only its parameters on meta "
            "(accelerate.init_empty_weights())")
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(set(dense.entries) - set(state))
    if unexpected:
        raise RPQCheckpointError(f"{dense.path}: tensors this {type(model).__name__} does not have: "
                                 f"{_listing(unexpected)} (another architecture or config?)")
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    missing = [group[0] for group in names.values() if not any(n in dense.entries for n in group)]
    if missing:
        raise RPQCheckpointError(f"{dense.path}: parameters of this {type(model).__name__} missing from the "
                                 f"checkpoint: {_listing(missing)}")
    for name, entry in dense.entries.items():
        tensor = state[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RPQCheckpointError(
                f"{entry.file}: '{name}' is {list(entry.shape)} {dtype_name(entry.dtype)} in the checkpoint, "
                f"{list(tensor.shape)} {dtype_name(tensor.dtype)} in the model (build the model with the "
                "checkpoint's config and dtype)")


def unfitted(config: RPQConfig) -> RPQConfig:
    """``config`` with every ``init`` random: the meta model is planned and drawn with it, then fitted here."""
    overrides = {pattern: {**values, "init": "random"} if "init" in values else values
                 for pattern, values in config.overrides.items()}
    return dataclasses.replace(config, init="random", overrides=overrides)


def _as_asked(plan: LayerPlan, config: RPQConfig) -> LayerPlan:
    """``plan`` (made with every init random) with the settings ``config`` resolves for it, as
    ``convert``'s planner asks (weight name, layer name, aliases)."""
    if not plan.converted:
        return plan
    settings = config.settings_for(plan.name, plan.name.rpartition(".")[0], *plan.aliases)
    if settings is None or dataclasses.replace(settings, init="random") != plan.settings:
        raise RuntimeError(f"convert_checkpoint: '{plan.name}' resolves to other settings than convert planned "
                           f"({settings} against {plan.settings}); please report this")
    return dataclasses.replace(plan, settings=settings)


def _install(model: nn.Module, plans: list[LayerPlan], weights: dict[str, RPQWeight]) -> None:
    """Put each RPQ weight in place of the meta one ``convert`` left at its names."""
    by_alias = {alias: weights[plan.name] for plan in plans if plan.converted for alias in plan.aliases}
    found = set()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, RPQWeight) and name in by_alias:
            weight = by_alias[name]
            weight.train(module.training)
            model.set_submodule(name, weight)
            found.add(id(weight))
    lost = [plan.name for plan in plans if plan.converted and id(weights[plan.name]) not in found]
    if lost:
        raise RuntimeError(f"convert_checkpoint: no RPQ weight at the names of {_listing(lost)}; please report this")


def _placeholder(plan: LayerPlan, model: nn.Module) -> LayerPlan:
    """``plan`` with a tiny CPU stand-in for its weight: ``new_weights`` reads only its device and
    ``requires_grad``, and so draws exactly what it draws for the dense model."""
    requires_grad = model.get_parameter(plan.name).requires_grad
    return dataclasses.replace(plan, param=torch.empty(0).requires_grad_(requires_grad))


def _fit_plain(model: nn.Module, plans: list[LayerPlan], weights: dict[str, RPQWeight],
               read: Callable[[str], torch.Tensor], seeds: dict[str, int], progress: bool) -> dict[str, FitOutcome]:
    """k-means of each weight on its own: read, fitted, freed, one at a time."""
    fits = {}
    todo = [plan for plan in plans if plan.name in seeds]
    for plan in progress_bar(todo, desc="rpq_fx fit", unit="layer", delay=2, enabled=progress):
        dense = dataclasses.replace(plan, param=read(plan))
        fits.update(fit_weights(model, [dense], {plan.name: weights[plan.name]}, seed=seeds[plan.name],
                                progress=False))
        del dense
    return fits


def convert_checkpoint(model: nn.Module, checkpoint: str | os.PathLike, out: str | os.PathLike,
                       num_codebooks: int | None = None, *, config: RPQConfig | None = None, filter_fn=None,
                       strict: bool = False, calibration=None, progress: bool = True, **settings) -> Path:
    """Convert ``model`` (built on the meta device) with the dense weights in ``checkpoint`` and write
    the RPQ checkpoint ``out`` that :func:`rpq_fx.load` reads; returns its path.

    ``checkpoint``: a safetensors file, or a folder with ``model.safetensors.index.json`` and its
    shards (or one ``model.safetensors``). Every name, shape, dtype and offset of the index and the
    headers is checked against ``model`` before anything is converted. Settings are ``convert``'s
    (``num_codebooks=``, ``codebook_dim=``, ``init="kmeans"``, ``seed=``, ``config=``, ...), and the
    result is what ``convert`` gives the model with its weights loaded: the same tensors, bit for bit.
    Weights are read one at a time and freed once fitted: peak memory is the largest layer (and its
    fit's work space) plus the RPQ result, whatever the model's size; with ``init="random"`` only
    the layers left dense are read. ``calibration`` makes the k-means fit data-aware, block by block
    (:func:`rpq_fx.fit.sequential.fit_sequential`: the model's one ``nn.ModuleList`` of blocks).

    ``out`` is written under a temporary name and renamed when complete: a conversion killed half-way
    leaves no file there (nor changes one already there). ``model`` itself is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_checkpoint: model must be a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = RPQConfig(num_codebooks=num_codebooks, **settings)
    elif num_codebooks is not None or settings:
        raise ValueError("convert_checkpoint: pass settings either in config or as arguments, not both")
    dense = DenseCheckpoint(checkpoint)
    _check_model(model, dense)
    converted = convert(model, config=unfitted(config), filter_fn=filter_fn, strict=strict, progress=False)
    record = conversion_record(converted)
    plans = [_as_asked(plan, config) for plan in record.layers]
    todo = [plan for plan in plans if plan.converted and plan.settings.init == "kmeans"]
    if calibration is not None and not todo:
        raise ValueError("convert_checkpoint: calibration= makes the k-means fit data-aware; "
                         "pass init='kmeans' with it")
    weights = new_weights([_placeholder(plan, model) for plan in plans if plan.converted], config.seed)
    seeds = {plan.name: config.seed + i for i, plan in enumerate(todo)}  # as convert's fit_weights seeds them

    def read(plan: LayerPlan) -> torch.Tensor:
        return dense.read(next(alias for alias in plan.aliases if alias in dense.entries))

    if calibration is None:
        fits = _fit_plain(model, plans, weights, read, seeds, progress)
    else:
        fits = fit_sequential(model, plans, weights, calibration, read=dense.read,
                              names=set(dense.entries), seeds=seeds, progress=progress)
    _install(converted, plans, weights)
    rpq = {name for name, m in converted.named_modules(remove_duplicate=False) if isinstance(m, RPQWeight)}
    materialise(converted, dense.read, set(dense.entries), skip=lambda name: name.rpartition(".")[0] in rpq)
    fits = {plan.name: fits.get(plan.name, FitOutcome("random")) for plan in plans if plan.converted}
    attach_record(converted, ConversionRecord(config, tuple(plans), record.path, fits))
    return save(converted, out)
