"""Helpers on a user's model that every layer shares: its mode, its device, calling it on one input
item, a copy emptied of its tensors, and the hooks told of every converted model. The lowest layer of
rpq_fx beside errors and config."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from numbers import Number

import torch
from torch import Tensor, nn

__all__ = ["training_mode", "model_device", "as_args", "input_items", "run_inputs", "empty_shell", "on_converted", "converted",
           "INPUT_ITEM"]

INPUT_ITEM = ("a tensor, a tuple or list of positional inputs, or a mapping of keyword inputs (a dict, a "
              "tokenizer's BatchEncoding)")


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
    """``(args, kwargs)`` of one input item, its tensors moved to ``device`` if given: a mapping
    (any ``collections.abc.Mapping``: a dict, a tokenizer's ``BatchEncoding``) is keyword inputs, a
    tuple or list positional inputs, anything else one positional input. Text, numbers and None are
    refused: they are not inputs a model takes as they are (tokenize text first)."""
    move = (lambda t: t.to(device) if isinstance(t, Tensor) and device is not None else t)
    if isinstance(inputs, Mapping):
        if not all(isinstance(k, str) for k in inputs):
            raise TypeError(f"an input mapping's keys must be the model's keyword names (str), got "
                            f"{sorted({type(k).__name__ for k in inputs})}")
        return (), {k: move(v) for k, v in inputs.items()}
    if inputs is None or isinstance(inputs, (str, bytes, Number)):
        raise TypeError(f"an input item must be {INPUT_ITEM}; got {type(inputs).__name__} {inputs!r:.60}"
                        + (": tokenize text first" if isinstance(inputs, (str, bytes)) else ""))
    return tuple(map(move, inputs if isinstance(inputs, (tuple, list)) else (inputs,))), {}


def input_items(data: Iterable, where: str) -> Sequence:
    """The input items of ``data`` (calibration, training or validation data), as a sequence that can be
    read more than once. One mapping (a tokenizer's ``BatchEncoding``, a dict) is one item, a batch:
    iterating it would hand over its keys as items."""
    if isinstance(data, Mapping):
        return [data]
    if isinstance(data, (str, bytes)):
        raise TypeError(f"{where} must be an iterable of input items ({INPUT_ITEM}), got {type(data).__name__} "
                        f"{data!r:.60}: tokenize text first")
    return data if isinstance(data, Sequence) else list(data)


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


_CONVERTED: list[Callable[[nn.Module], None]] = []


def on_converted(hook: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register ``hook(model)`` to run on every model given a conversion record (what ``convert`` and
    ``load`` return): the extension point integrations use (transformers marks its models quantized)."""
    _CONVERTED.append(hook)
    return hook


def converted(model: nn.Module) -> None:
    """Run every :func:`on_converted` hook on ``model``."""
    for hook in tuple(_CONVERTED):
        hook(model)
