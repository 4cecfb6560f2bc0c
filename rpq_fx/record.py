"""``conversion_record(model)``: what a conversion did, one type for every result shape.

``convert`` (and ``load``) attach a :class:`ConversionRecord` to what they return: in
``gm.meta`` for a converted GraphModule (``copy.deepcopy`` of a GraphModule keeps ``meta`` and
nothing else of its own), in the ``__dict__`` of a model converted in place. Every consumer
(report, decompress, save) reads it through :func:`conversion_record`; it survives pickling,
``copy.deepcopy`` and ``torch.save`` of the converted model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from .config import RPQConfig

if TYPE_CHECKING:
    from .passes import LayerPlan

__all__ = ["ConversionRecord", "FitOutcome", "conversion_record", "attach_record"]

_KEY = "rpq_record"
_LEGACY = {"rpq_layers": "layers", "rpq_config": "config", "rpq_path": "path"}


FILLS = ("random", "kmeans", "kmeans+calibration")


@dataclass(frozen=True)
class FitOutcome:
    """How a converted weight was filled: ``"random"``, ``"kmeans"`` or ``"kmeans+calibration"``, and
    for a fit its relative error (the objective, weight or output error, against the weight's own)."""

    filled: str
    error: float | None = None


@dataclass(frozen=True)
class ConversionRecord:
    """The config a model was converted with, one ``LayerPlan`` per weight (converted with which
    settings and split, or why it stayed dense), how each converted weight was filled (``fits``, by
    layer name) and how the model was captured: ``"torch.fx"``, ``"torch.export"`` or ``"in place (...)"``."""

    config: RPQConfig
    layers: tuple[LayerPlan, ...]
    path: str | None
    fits: dict[str, FitOutcome] = field(default_factory=dict)


def conversion_record(model: nn.Module) -> ConversionRecord | None:
    """The :class:`ConversionRecord` of a model returned by ``convert`` or ``load`` (either result
    shape), or None for a model that was not converted as a whole."""
    store = model.meta if isinstance(model, fx.GraphModule) else vars(model)
    record = store.get(_KEY)
    return record if isinstance(record, ConversionRecord) else None


def attach_record(model: nn.Module, record: ConversionRecord) -> None:
    """Attach ``record`` to ``model`` (replacing any earlier one), where :func:`conversion_record` finds it.

    A model converted in place also gets ``rpq_layers`` / ``rpq_config`` / ``rpq_path``, read-only
    views of the record kept for code written against them (a converted GraphModule answers them
    as properties)."""
    if isinstance(model, fx.GraphModule):
        model.meta[_KEY] = record
        return
    vars(model)[_KEY] = record
    for legacy, field in _LEGACY.items():
        value = getattr(record, field)
        vars(model)[legacy] = list(value) if field == "layers" else value
