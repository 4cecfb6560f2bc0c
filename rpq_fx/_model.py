"""Helpers on a user's model that every layer shares: its mode, its device, calling it on one input
item, and a copy emptied of its tensors. The lowest layer of rpq_fx beside errors and config."""

from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["training_mode", "model_device", "as_args", "run_inputs", "empty_shell"]


@contextmanager
def training_mode(model: nn.Module, training: bool):
    """``model`` in train or eval mode for the duration, every module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """Where ``model``'s parameters are (its inputs go there), or None for a model without any."""
    return next((p.device for p in model.parameters()), None)


def as_args(inputs, device: torch.device | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one input item (a tensor, a tuple or list of positional inputs or a
    dict of keywords), its tensors moved to ``device`` if given."""
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    if isinstance(inputs, dict):
        return (), {k: move(v) for k, v in inputs.items()}
    return tuple(map(move, inputs if isinstance(inputs, (tuple, list)) else (inputs,))), {}


def run_inputs(model: nn.Module, inputs, device: torch.device | None = None, replaced: dict[str, Tensor] | None = None):
    """Call ``model`` on one input item (see :func:`as_args`); with the parameters named in
    ``replaced`` swapped in (``torch.func.functional_call``)."""
    args, kwargs = as_args(inputs, device)
    if replaced:
        return torch.func.functional_call(model, replaced, args, kwargs, strict=False)
    return model(*args, **kwargs)


def empty_shell(module: nn.Module) -> nn.Module:
    """``module`` with every parameter and buffer set to None, for ``functional_call`` to fill: it
    keeps its code, hyper-parameters and train/eval flag, and holds no tensor of its own."""
    for owner in module.modules():
        owner._parameters.update(dict.fromkeys(owner._parameters))
        owner._buffers.update(dict.fromkeys(owner._buffers))
    return module
