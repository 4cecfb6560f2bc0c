"""Fit RPQ weights to a trained model (``init="kmeans"``), data-aware with calibration inputs.

:func:`fit_weights` fits every planned weight (:func:`~rpq_fx.fit.layer.fit_layer`, by :func:`fit_rows`) and
writes the codebooks and codes into its ``RPQWeight``; with calibration inputs, :func:`collect_stats` first records what
each layer sees when the layers before it are already fitted.
"""

import torch
from torch import nn

from .._model import input_items
from .._progress import progress_bar
from ..nn.weight import RPQWeight
from ..record import FitOutcome, LayerPlan
from . import sequential
from .calibrate import LayerStats, call_groups, collect_stats
from .kmeans import kmeans, nearest
from .layer import fit_layer
from .quantize import FitResult, fit_rows

__all__ = ["collect_stats", "fit_weights", "fit_layer", "fit_rows", "kmeans", "nearest", "LayerStats", "FitResult"]


def fit_weights(model: nn.Module, plans: list[LayerPlan], weights: dict[str, RPQWeight], calibration=None, *,
                seed: int = 0, progress: bool = True, by_blocks: bool = True) -> dict[str, FitOutcome]:
    """Fit every converted plan whose init is ``"kmeans"`` (its ``RPQWeight`` in ``weights`` by plan
    name) to ``model``'s trained weights, and say how each was fitted (by plan name); a progress bar
    shows when it takes a while.

    With ``calibration`` the fit is data-aware and sequential, as GPTQ's: layers are fitted in the
    order the model calls them, each on the inputs it receives when every layer before it already
    computes with its fitted weight, and (``settings.asymmetric``) to the dense model's output there,
    so each fit corrects the error that reaches it. Layers reading the same input (a block's query,
    key and value) share one pass. Layers no hook can observe
    (functional calls, attention modules) get plain k-means.

    Where the model's blocks allow it (:func:`~rpq_fx.fit.sequential.block_split`; ``by_blocks``), each
    block's statistics come from running that block alone on the hidden states the blocks before it
    gave, kept per calibration item (:func:`~rpq_fx.fit.sequential.fit_blocks`): the same statistics,
    without running the blocks before it again for every group of layers. ``by_blocks=False`` always
    runs the whole model (the reference the tests hold the block-by-block path to).
    """
    todo = [plan for plan in plans if plan.converted and plan.settings.init == "kmeans"]
    order = {plan.name: i for i, plan in enumerate(todo)}
    items = None if calibration is None else input_items(calibration, "calibration")
    if items is not None and not items:
        raise ValueError(f"convert: calibration= holds no items (got {type(calibration).__name__}: an empty "
                         "sequence, or an iterator or generator already used up); pass example inputs (tensors, "
                         "tuples of positional inputs or dicts of keyword inputs), or calibration=None for a plain "
                         "k-means fit")
    if items and by_blocks:
        blocks = sequential.block_split(model, items[0], todo)
        if blocks is not None:
            seeds = {plan.name: seed + order[plan.name] for plan in todo}
            return sequential.fit_blocks(model, blocks, todo, weights, items, seeds, fit_layer, progress=progress)
    groups, once = call_groups(model, todo, items[0]) if items else ([], set())
    observed = {plan.name for group in groups for plan in group}
    groups += [[plan] for plan in todo if plan.name not in observed]
    replaced: dict[str, torch.Tensor] = {}
    fits: dict[str, FitOutcome] = {}
    with progress_bar(total=len(todo), desc="rpq_fx fit", unit="layer", delay=2, enabled=progress) as bar:
        for group in groups:
            calibrated = group[0].name in observed
            # reason: a forward can end at the group's last layer, unless one of them is called again later
            early = all(plan.name in once for plan in group)
            asymmetric = any(plan.settings.asymmetric for plan in group)
            stats = collect_stats(model, group, items, replaced=replaced, stop_early=early, asymmetric=asymmetric,
                                  progress=False) if calibrated else {}
            for plan in group:
                bar.set_postfix_str(plan.name, refresh=False)
                fits[plan.name] = fit_layer(plan, weights[plan.name], stats.pop(plan.name, None),
                                            seed + order[plan.name])
                if calibrated:
                    with torch.no_grad():
                        replaced.update(dict.fromkeys(plan.aliases, weights[plan.name]()))
                bar.update()
    return fits
