"""``conversion_record(model)``: what a conversion did, one type for every result shape.

Its parts: a :class:`LayerPlan` per weight (the settings it was converted with and the split, or
why it stayed dense) and a :class:`FitOutcome` per converted weight (how it was filled), here
below ``passes`` and ``fit``, which make them, and above ``config`` and ``nn``.

``convert`` (and ``load``) attach a :class:`ConversionRecord` to what they return: in
``gm.meta`` for a converted GraphModule (``copy.deepcopy`` of a GraphModule keeps ``meta`` and
nothing else of its own), in the ``__dict__`` of a model converted in place. Every consumer
(report, decompress, save) reads it through :func:`conversion_record`; it survives pickling,
``copy.deepcopy`` and ``torch.save`` of the converted model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .config import LayerSettings, RPQConfig
from .nn.weight import additive_bytes, hot_bytes

__all__ = ["ConversionRecord", "LayerPlan", "FitOutcome", "conversion_record", "attach_record"]

_KEY = "rpq_record"
_LEGACY = {"rpq_layers": "layers", "rpq_config": "config", "rpq_path": "path"}


@dataclass
class LayerPlan:
    """One weight: converted (``reason is None``) with ``settings`` and the split they give its rows,
    or left dense, and why."""

    name: str
    aliases: tuple[str, ...]
    ops: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    settings: LayerSettings | None = None  # the resolved settings of a converted weight; None if left dense
    num_codebooks: int | None = None  # the split of each row: num_codebooks slices of codebook_dim values
    codebook_dim: int | None = None
    reason: str | None = None
    excluded: bool = False  # left dense on purpose (filter_fn or a config override), not for want of support
    transposed: bool = False  # read as W.T (GPT-2's Conv1D): RPQ rows are the parameter's columns
    padding_rows: tuple[int, ...] = ()  # embedding rows lookups never train (padding_idx): kept at zero
    param: nn.Parameter | None = field(default=None, repr=False, compare=False)

    @property
    def rows_shape(self) -> tuple[int, ...]:
        """The weight as RPQ rows: ``[rows, ...]``, each row split into codebook slices."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape

    @property
    def converted(self) -> bool:
        return self.reason is None

    @property
    def hot_rows(self) -> int:
        """How many rows get a residual code: the setting's, at most the rows that are not padding."""
        if self.settings is None or not self.settings.hot_rows:
            return 0
        return min(self.settings.hot_rows, self.rows_shape[0] - len(self.padding_rows))

    @property
    def codebook_dtype(self) -> torch.dtype:
        """The dtype the codebooks are stored in: the setting's, or the weight's own."""
        name = self.settings.codebook_dtype if self.settings is not None else None
        return self.dtype if name is None else getattr(torch, name)

    @property
    def bytes_before(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def bytes_after(self) -> int:
        if not self.converted:
            return self.bytes_before
        settings, element_size = self.settings, self.codebook_dtype.itemsize
        return (additive_bytes(self.num_codebooks, self.codebook_dim, self.rows_shape[0], settings.num_codes,
                               settings.shared_codebooks, element_size, settings.additive_codebooks)
                + hot_bytes(self.num_codebooks * self.codebook_dim, self.hot_rows, settings.hot_codebook_dim,
                            settings.num_codes, element_size))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per dense value: codebooks and codes (one byte each, two above 256 codewords) of
        every additive stage, and the hot rows' part."""
        return 8 * self.bytes_after / math.prod(self.shape)


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
