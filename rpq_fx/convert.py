"""The public entry points: ``convert(model, ...)`` and the one-liner ``RPQ(model)``."""

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .config import RPQConfig
from .errors import RPQConversionError
from .graph_module import RPQGraphModule
from .nn.weight import RPQWeight
from .passes import LayerPlan, capture, cleanup, insert_checkpoints, new_weights, plan_conversion, rewrite

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


def _copy_for_conversion(gm: RPQGraphModule, plans: list[LayerPlan]) -> RPQGraphModule:
    """A deep copy of ``gm`` in which the weights about to be converted are free meta placeholders."""
    memo = {id(plan.param): nn.Parameter(torch.empty(plan.shape, dtype=plan.dtype, device="meta"))
            for plan in plans if plan.converted}
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


def convert(model: nn.Module, num_codebooks: int | None = None, *, codebook_dim: int | None = None,
            max_codebook_dim: int | None = None, num_codes: int = 256, shared_codebooks: bool = False,
            checkpoint: bool = False, filter_fn: FilterFn | None = None, config: RPQConfig | None = None,
            seed: int = 0, inplace: bool = False, strict: bool = False) -> RPQGraphModule:
    """Rewrite every linear / conv / embedding weight of ``model`` as an RPQ weight.

    Exactly one of ``num_codebooks``, ``codebook_dim`` or ``max_codebook_dim`` sets how each weight
    row is split (or ``config`` does, with per-layer overrides). ``filter_fn(layer_or_weight, name)``
    picks layers: it is asked about every layer that reads a weight (each, for a tied weight), and
    the weight is converted only if it accepts them all. Layers that cannot be converted stay dense and are listed by :func:`report`;
    ``strict=True`` raises instead. ``checkpoint=True`` recomputes each expanded weight in backward.

    The input model is left untouched unless ``inplace=True``, which moves its modules into the
    result and deletes its converted weights (the input is then consumed). Converting a model
    that already holds RPQ weights is an error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    config = _config(config, num_codebooks=num_codebooks, codebook_dim=codebook_dim,
                     max_codebook_dim=max_codebook_dim, num_codes=num_codes, shared_codebooks=shared_codebooks,
                     checkpoint=checkpoint, seed=seed)
    converted = next((name for name, m in model.named_modules() if isinstance(m, RPQWeight)), None)
    if converted is not None:
        raise RPQConversionError(f"convert: {type(model).__name__} already holds an RPQ weight at '{converted}'; "
                                 "convert the original dense model instead")
    gm = capture(model)
    plans = plan_conversion(gm, model, config, filter_fn, strict)
    if not inplace:
        gm = _copy_for_conversion(gm, plans)
    rewrite(gm, plans, new_weights(plans, config.seed))
    if config.checkpoint:
        insert_checkpoints(gm)
    cleanup(gm)
    if inplace:
        _free_converted(model, plans)
    gm.meta["rpq_layers"] = [dataclasses.replace(plan, param=None) for plan in plans]
    gm.meta["rpq_config"] = config
    gm.training = model.training
    return gm


def RPQ(model: nn.Module, **kwargs) -> RPQGraphModule:
    """``net = RPQ(net)``: :func:`convert` with RPQ defaults (codewords of at most 64 values)."""
    if not {"num_codebooks", "codebook_dim", "max_codebook_dim", "config"} & kwargs.keys():
        kwargs["max_codebook_dim"] = 64
    return convert(model, **kwargs)
