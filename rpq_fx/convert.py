"""The public entry points: ``convert(model, ...)`` and the one-liner ``RPQ(model)``."""

import copy
import dataclasses
import inspect
from collections.abc import Callable

import torch
from torch import nn

from .config import RPQ_MAX_CODEBOOK_DIM, RPQConfig
from .errors import RPQConversionError
from .fit import fit_weights
from .graph_module import RPQGraphModule
from .nn.weight import RPQWeight
from .passes import (LayerPlan, capture, capture_call, capture_export, capture_layer, cleanup, fuse,
                     insert_checkpoints, new_weights, plan_conversion, rewrite)
from .passes.weight_ops import LAYERS
from .record import ConversionRecord, FitOutcome, attach_record

__all__ = ["convert", "RPQ"]

FilterFn = Callable[[nn.Module | nn.Parameter, str], bool]


def _config(config: RPQConfig | None, **settings) -> RPQConfig:
    if config is None:
        return RPQConfig(**settings)
    if not isinstance(config, RPQConfig):
        raise TypeError(f"convert: config must be an RPQConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(RPQConfig) if f.name in settings}
    clashes = {name: value for name, value in settings.items() if value != defaults[name]}
    if clashes:
        raise ValueError(f"convert: pass settings either in config or as arguments, not both (got config and "
                         f"{', '.join(f'{k}={v!r}' for k, v in clashes.items())})")
    return config


def _fits(config: RPQConfig) -> bool:
    """Whether any layer is fitted with k-means (the default or an override says so)."""
    return config.init == "kmeans" or any(o.get("init") == "kmeans" for o in config.overrides.values())


def _placeholders(plans: list[LayerPlan]) -> dict[int, nn.Parameter]:
    """A ``deepcopy`` memo that copies each weight about to be converted as a free meta placeholder."""
    return {id(plan.param): nn.Parameter(torch.empty(plan.shape, dtype=plan.dtype, device="meta"))
            for plan in plans if plan.converted}


def _copy(gm: RPQGraphModule, memo: dict) -> RPQGraphModule:
    result = copy.deepcopy(gm, memo)
    type(result).__name__ = type(gm).__name__  # reason: GraphModule.__deepcopy__ forgets the class name
    return result


def _free_converted(model: nn.Module, plans: list[LayerPlan]) -> None:
    """Delete the converted dense weights from ``model`` itself (``inplace=True``)."""
    for plan in plans:
        for alias in plan.aliases if plan.converted else ():
            owner_path, _, name = alias.rpartition(".")
            owner = model.get_submodule(owner_path)
            if name in owner._parameters:
                delattr(owner, name)


def _weights(model: nn.Module, plans: list[LayerPlan], config: RPQConfig, calibration,
             progress: bool) -> tuple[dict[str, RPQWeight], dict[str, FitOutcome]]:
    """The RPQ weights of ``plans`` and how each was filled: drawn at random, then fitted where a
    plan's init is ``"kmeans"``, to the statistics of ``model`` (still dense) on the calibration
    inputs, if given."""
    weights = new_weights(plans, config.seed)
    fits = fit_weights(model, plans, weights, calibration, seed=config.seed, progress=progress)
    return weights, {plan.name: fits.get(plan.name, FitOutcome("random")) for plan in plans if plan.converted}


def _finish(gm: RPQGraphModule, plans: list[LayerPlan], weights: dict, config: RPQConfig, prefix: str = "") -> None:
    """Rewrite, checkpoint and clean up one captured graph module."""
    rewrite(gm, plans, weights, prefix)
    fuse(gm)
    if config.checkpoint:
        insert_checkpoints(gm)
    cleanup(gm)


def _record(target: nn.Module, plans: list[LayerPlan], fits: dict[str, FitOutcome], config: RPQConfig,
            path: str) -> None:
    layers = tuple(dataclasses.replace(plan, param=None) for plan in plans)
    attach_record(target, ConversionRecord(config, layers, path, fits))


def _convert_graph(model: nn.Module, gm: RPQGraphModule, path: str, config: RPQConfig, filter_fn, strict: bool,
                   inplace: bool, calibration, progress: bool) -> RPQGraphModule:
    """The whole model as one graph (fx or torch.export)."""
    plans = plan_conversion(gm, model, config, filter_fn, strict)
    weights, fits = _weights(model, plans, config, calibration, progress)
    if not inplace:
        gm = _copy(gm, _placeholders(plans))
    _finish(gm, plans, weights, config)
    if inplace:
        _free_converted(model, plans)
    _record(gm, plans, fits, config, path)
    gm.training = model.training
    return gm


def _capture_part(module: nn.Module) -> RPQGraphModule:
    """One weight-owning module of a model rewritten in place: a known layer as its functional op; a
    module whose forward traces with no argument fixed by tracing (no ``None`` default a branch could
    test) as its traced graph, so its ops are seen (GPT-2's ``Conv1D`` reads its weight transposed);
    any other module run untraced through ``functional_call``."""
    if type(module) in LAYERS:
        return capture_layer(module)
    if all(p.default is not None for p in inspect.signature(module.forward).parameters.values()):
        try:
            return capture(module)
        except RPQConversionError:
            pass
    return capture_call(module)


def _convert_in_place(model: nn.Module, why: RPQConversionError, config: RPQConfig, filter_fn, strict: bool,
                      inplace: bool, calibration, progress: bool) -> nn.Module:
    """The model object kept, each module that owns a weight swapped for its own rewritten graph:
    a known layer as its functional op, any other module running its own forward, untraced, through
    ``functional_call``. Weights are planned over all of them at once, so a weight tied across
    layers stays one RPQ weight."""
    parts = {name: _capture_part(module) for name, module in model.named_modules()
             if name and any(p.dim() >= 2 for p in module.parameters(recurse=False))}
    plans = plan_conversion(parts, model, config, filter_fn, strict)
    weights, fits = _weights(model, plans, config, calibration, progress)
    memo = {} if inplace else _placeholders(plans)
    work = model if inplace else copy.deepcopy(model, memo)
    for name, part in parts.items():
        part = part if inplace else _copy(part, memo)
        _finish(part, plans, weights, config, prefix=f"{name}.")
        if any(isinstance(m, RPQWeight) for m in part.modules()):
            original = work.get_submodule(name)
            part.train(original.training)
            for attribute, value in vars(original).items():  # stride, padding_idx, ... for code that reads them
                if not attribute.startswith("_") and not hasattr(part, attribute):
                    setattr(part, attribute, value)
            work.set_submodule(name, part)
    if inplace:
        _free_converted(model, plans)
    _record(work, plans, fits, config, f"in place ({why.__cause__.__class__.__name__} when tracing the whole model)")
    return work


def convert(model: nn.Module, num_codebooks: int | None = None, *, codebook_dim: int | None = None,
            max_codebook_dim: int | None = None, num_codes: int = 256, shared_codebooks: bool = False,
            init: str = "random", codebook_dtype: str | torch.dtype | None = None, checkpoint: bool = False,
            filter_fn: FilterFn | None = None, config: RPQConfig | None = None, seed: int = 0, inplace: bool = False,
            strict: bool = False, example_inputs=None, calibration=None, progress: bool = True) -> nn.Module:
    """Rewrite every linear / conv / embedding weight of ``model`` as an RPQ weight.

    Exactly one of ``num_codebooks``, ``codebook_dim`` or ``max_codebook_dim`` sets how each weight
    row is split (or ``config`` does, with per-layer overrides). ``filter_fn(layer_or_weight, name)``
    picks layers: it is asked about every layer that reads a weight (each, for a tied weight) and
    must answer True or False; the weight is converted only if it accepts them all. Layers that
    cannot be converted stay dense and are listed by :func:`report`; ``strict=True`` raises instead.
    ``checkpoint=True`` recomputes each expanded weight in backward.

    ``init="random"`` (the RPQ default) draws codes and codebooks for training from scratch;
    ``init="kmeans"`` fits them to the model's trained weights (product quantization, k-means per
    codebook). ``calibration``, an iterable of example inputs (each a tensor, a tuple of positional
    inputs or a dict of keyword inputs), makes that fit data-aware: the dense model is run on them
    (in eval mode, without grad) and each linear / conv layer is fitted to minimise its output
    error on those inputs, each embedding weighted by how often its rows were looked up.
    ``codebook_dtype="float16"`` / ``"bfloat16"`` stores the codebooks in half precision.
    ``progress`` shows a bar for calibration and fitting when they take more than two seconds.

    How the model is captured (``report`` says which):

    - ``example_inputs`` given (a tensor, a tuple of positional inputs or a dict of keyword inputs):
      ``torch.export``, an aten-level :class:`RPQGraphModule` fixed to the current train/eval mode;
    - otherwise ``torch.fx`` symbolic tracing of the whole model, an :class:`RPQGraphModule`;
    - and where fx cannot trace the whole (every Hugging Face model, for one), the model object is
      kept, with each layer that owns a weight swapped for its own rewritten graph, so its class,
      ``config``, ``generate()`` and every other method keep working.

    The input model is left untouched unless ``inplace=True``, which moves its modules into the
    result and deletes its converted weights (the input is then consumed). Converting a model
    that already holds RPQ weights is an error. Random draws come from generators seeded by
    ``seed``, never from torch's global generator; a weight with ``requires_grad=False`` gets
    frozen codebooks. Layer types of your own: :func:`register_layer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    config = _config(config, num_codebooks=num_codebooks, codebook_dim=codebook_dim,
                     max_codebook_dim=max_codebook_dim, num_codes=num_codes, shared_codebooks=shared_codebooks,
                     init=init, codebook_dtype=codebook_dtype, checkpoint=checkpoint, seed=seed)
    if calibration is not None and not _fits(config):
        raise ValueError("convert: calibration= makes the k-means fit data-aware; pass init='kmeans' with it")
    converted = next((name for name, m in model.named_modules() if isinstance(m, RPQWeight)), None)
    if converted is not None:
        raise RPQConversionError(f"convert: {type(model).__name__} already holds an RPQ weight at '{converted}'; "
                                 "convert the original dense model instead")
    options = dict(config=config, filter_fn=filter_fn, strict=strict, inplace=inplace, calibration=calibration,
                   progress=progress)
    if example_inputs is not None:
        return _convert_graph(model, capture_export(model, example_inputs), "torch.export", **options)
    try:
        gm = capture(model)
    except RPQConversionError as untraceable:
        return _convert_in_place(model, untraceable, **options)
    return _convert_graph(model, gm, "torch.fx", **options)


def RPQ(model: nn.Module, **kwargs) -> nn.Module:
    """``net = RPQ(net)``: :func:`convert` with RPQ defaults (codewords of at most
    ``RPQ_MAX_CODEBOOK_DIM`` = 64 values)."""
    if not {"num_codebooks", "codebook_dim", "max_codebook_dim", "config"} & kwargs.keys():
        kwargs["max_codebook_dim"] = RPQ_MAX_CODEBOOK_DIM
    return convert(model, **kwargs)
