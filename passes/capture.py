"""Capture: an ``nn.Module`` as a ``torch.fx.GraphModule`` by symbolic tracing.

The GraphModule shares the model's submodules and parameters (nothing is copied here).
"""

import importlib.util

import torch.fx as fx
from torch import nn

from rpq_fx.errors import RPQConversionError

__all__ = ["capture", "RPQTracer"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's registry of modules and functions that fx must not trace into (empty without timm)."""
    if importlib.util.find_spec("timm") is None:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class RPQTracer(fx.Tracer):
    """fx's default leaf policy (``torch.nn`` layers are leaves), plus timm's no-trace registry."""

    def __init__(self):
        self.notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=notrace_functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.notrace_modules) or super().is_leaf_module(m, module_qualified_name)


def capture(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, or raise an error that says what to do instead."""
    tracer = RPQTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:
        raise RPQConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}\n"
            "Control flow that depends on input values cannot be traced. Convert a traceable part instead "
            "(rpq_fx.convert(model.backbone, ...)), or make that control flow static."
        ) from error
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
