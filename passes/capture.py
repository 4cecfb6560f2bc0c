"""Capture: an ``nn.Module`` as a GraphModule, by symbolic tracing (in train and in eval mode) or
by ``torch.export`` on example inputs.

The GraphModule shares the model's submodules and parameters (nothing is copied here). If the
model traces differently in the other mode (``if self.training:`` in its code), that graph is
kept too, in ``gm.meta["rpq_mode_graphs"]``, over the same modules.
"""

import copy
import inspect
import sys
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch import nn

from rpq_fx._model import as_args, empty_shell, training_mode
from rpq_fx.errors import RPQConversionError
from rpq_fx.graph_module import RPQGraphModule

from .weight_ops import LAYERS, emit_layer_call

__all__ = ["capture", "capture_layer", "capture_call", "capture_export", "RPQTracer"]


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's registry of modules and functions that fx must not trace into; empty unless timm is
    already imported (then no model holds its layers, and importing it costs ~190 MiB)."""
    if "timm" not in sys.modules:
        return (), ()
    from timm.layers import get_notrace_functions, get_notrace_modules

    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class RPQTracer(fx.Tracer):
    """fx's default leaf policy (``torch.nn`` layers are leaves), plus the registered layers
    (:func:`register_layer`) and timm's no-trace registry."""

    def __init__(self):
        self.notrace_modules, notrace_functions = _timm_notrace()
        super().__init__(autowrap_functions=notrace_functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (type(m) in LAYERS or isinstance(m, self.notrace_modules)
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: nn.Module) -> fx.Graph:
    return RPQTracer().trace(model)


def _union_root(model: nn.Module, graphs: list[fx.Graph]) -> fx.Graph:
    """A graph that only names every attribute the ``graphs`` read, so a GraphModule built on it
    holds all of them (a GraphModule copies just what its graph names)."""
    union = fx.Graph()
    targets = {(n.op, n.target) for g in graphs for n in g.nodes if n.op in ("get_attr", "call_module")}
    for op, target in sorted(targets):
        union.create_node(op, target)
    union.output(None)
    return union


def capture(model: nn.Module) -> RPQGraphModule:
    """Trace ``model`` into a GraphModule, or raise an error that says what to do instead."""
    try:
        graph = _trace(model)
    except Exception as error:
        raise RPQConversionError(
            f"torch.fx could not trace {type(model).__name__}: {type(error).__name__}: {error}\n"
            "Control flow that depends on input values cannot be traced. Convert a traceable part instead "
            "(rpq_fx.convert(model.backbone, ...)), or make that control flow static."
        ) from error
    mode, other, untraced = model.training, None, None
    try:
        with training_mode(model, not mode):
            other = _trace(model)
    except Exception as error:
        untraced = (not mode, f"{type(model).__name__} was converted in {'train' if mode else 'eval'} mode and "
                              f"torch.fx cannot trace it in the other ({type(error).__name__}: {error}); "
                              "convert it in the mode you will run it in")
    if other is not None and other.python_code("self").src == graph.python_code("self").src:
        other = None
    try:
        gm = RPQGraphModule(model, _union_root(model, [graph] + ([other] if other else [])), type(model).__name__)
        gm.graph = graph
    except SyntaxError as error:  # reason: fx writes module names into Python source unescaped ('a"b' in a ModuleDict)
        raise RPQConversionError(
            f"torch.fx traced {type(model).__name__} but cannot write its forward as Python ({error.msg}): a module "
            "name holds a character Python source cannot (a quote in a ModuleDict key?); capture='module' keeps the "
            "model object instead") from error
    if other is not None:
        gm.meta["rpq_mode_graphs"] = {mode: graph, not mode: other}
    if untraced is not None:
        gm.meta["rpq_untraced_mode"] = untraced
    return gm


def capture_layer(layer: nn.Module) -> RPQGraphModule:
    """A registered layer (see ``weight_ops.LAYERS``) as a graph: a built-in one (``nn.Linear``,
    ``nn.Conv2d``, ...) as its functional op, written out rather than traced (their forwards branch
    on arguments fx would make into proxies: ``output_size`` of a transposed conv, which the graph
    does not take); a user's own running its forward untraced (:func:`capture_call`)."""
    if not LAYERS[type(layer)].builtin:
        return capture_call(layer)
    graph = fx.Graph()
    signature = inspect.signature(layer.forward).parameters.values()
    arguments = {p.name: graph.placeholder(p.name, default_value=p.default) for p in signature
                 if p.name != "output_size"}
    bias = graph.get_attr("bias") if getattr(layer, "bias", None) is not None else None
    graph.output(emit_layer_call(graph, layer, arguments, graph.get_attr("weight"), bias))
    return RPQGraphModule(layer, graph, type(layer).__name__)


def capture_call(module: nn.Module) -> RPQGraphModule:
    """Any module that owns weights as a graph that runs its own forward, untraced, through
    ``torch.func.functional_call`` with its tensors read from the graph module: no argument gets
    fixed by tracing (``if position_ids is None:``), whatever the forward does."""
    state = {**dict(module.named_parameters(remove_duplicate=False)),
             **dict(module.named_buffers(remove_duplicate=False))}
    graph = fx.Graph()
    args, kwargs = graph.placeholder("*args"), graph.placeholder("**kwargs")
    tensors = {name: graph.get_attr(name) for name in state}
    graph.output(graph.call_function(torch.func.functional_call, (graph.get_attr("module"), tensors, args, kwargs)))
    # reason: a copy's other references to its tensors (an RNN's _flat_weights list) must not become None,
    # which functional_call leaves there; meta placeholders hold no memory
    memo = {id(t): nn.Parameter(t.detach().to("meta"), t.requires_grad) if isinstance(t, nn.Parameter) else
            t.detach().to("meta") for t in state.values()}
    shell = empty_shell(copy.deepcopy(module, memo))
    return RPQGraphModule({**state, "module": shell}, graph, type(module).__name__)


def _dynamic_batch_and_sequence(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``Dim.AUTO`` on the first two dims of every tensor input: dynamic where the model allows."""
    def dims(value):
        return {i: torch.export.Dim.AUTO for i in range(min(value.dim(), 2))} if isinstance(value, torch.Tensor) else None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: torch.utils._pytree.tree_map(dims, value) for name, value in bound.arguments.items()}


@contextmanager
def _without_cache(model: nn.Module, kwargs: dict):
    """A Hugging Face model's ``config.use_cache`` off for the duration (on every config in it: T5's
    decoder has its own), unless the inputs set ``use_cache``: a causal LM or T5 otherwise returns a
    ``DynamicCache`` / ``EncoderDecoderCache``, which ``torch.export`` cannot return (it is no pytree)."""
    configs = [] if "use_cache" in kwargs else list({
        id(config): config for m in model.modules() if getattr(config := getattr(m, "config", None), "use_cache",
                                                                None) is True}.values())
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def capture_export(model: nn.Module, example_inputs) -> RPQGraphModule:
    """Capture ``model`` with ``torch.export`` on ``example_inputs`` (a tensor, a tuple of positional
    inputs or a dict of keyword inputs): an aten-level graph, dynamic in batch and sequence where the
    model allows. The graph is fixed to the model's current train/eval mode, and for a Hugging Face
    model to ``use_cache=False`` unless the inputs say otherwise (the captured model returns no cache)."""
    args, kwargs = as_args(example_inputs)
    try:
        with _without_cache(model, kwargs):
            program = _export(model, args, kwargs)
    except Exception as error:
        raise RPQConversionError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {error}\n"
            "Call convert with capture='module' (and no example_inputs) to rewrite its layers in place instead."
        ) from error
    module = program.module()
    gm = RPQGraphModule(module, module.graph, type(model).__name__)
    mode = "train" if model.training else "eval"
    gm.meta["rpq_untraced_mode"] = (not model.training, f"{type(model).__name__} was exported in {mode} mode, which "
                                    "torch.export fixes in the graph; convert it in the mode you will run it in")
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export.export``, dynamic in batch and sequence where the model allows, else static."""
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_batch_and_sequence(model, args, kwargs))
    except Exception:  # reason: some models guard every dim; a static export is still a valid capture
        return torch.export.export(model, args, kwargs)
