"""Distillation losses: how far a converted model's output is from the dense model's, shared by
:func:`~rpq_fx.finetune` (what it trains on) and :func:`~rpq_fx.allocate` (what each size costs)."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._model import run_inputs
from .fit.calibrate import drop_padding, padding_mask

__all__ = ["distillation_loss", "default_loss", "mean_loss", "model_output"]


def model_output(value) -> Tensor:
    """The tensor to match in a model's output: itself, a ModelOutput's logits or last hidden state,
    or the first tensor of a tuple."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        for key in ("logits", "last_hidden_state"):
            if value.get(key) is not None:
                return value[key]
        value = list(value.values())
    if isinstance(value, (tuple, list)) and value:
        return model_output(value[0])
    raise TypeError(f"finetune: cannot find a tensor to distil in an output of type {type(value).__name__}; "
                    "pass loss= a function of the two outputs")


def distillation_loss(student, teacher, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of the student's output tensor, relative to the teacher's mean square;
    ``mask [batch, length]`` (an attention mask) leaves the padding positions out."""
    s, t = model_output(student), model_output(teacher)
    keep = None if mask is None else mask.bool()
    s, t = drop_padding(s, keep), drop_padding(t, keep)
    return (s - t).square().mean() / t.square().mean().clamp_min(1e-12)


def mean_loss(model: nn.Module, items: Sequence, targets: list, loss: Callable, device,
              replaced: dict[str, Tensor] | None = None) -> float:
    """``loss(output, target, item)`` over ``items``, without grad; ``replaced`` parameters swapped in."""
    with torch.no_grad():
        return sum(float(loss(run_inputs(model, x, device, replaced), t, x)) for x, t in zip(items, targets)) / len(items)


def default_loss(student, teacher, item) -> Tensor:
    """:func:`distillation_loss` with an item's padding positions (its ``attention_mask``) left out."""
    return distillation_loss(student, teacher, padding_mask(item))
