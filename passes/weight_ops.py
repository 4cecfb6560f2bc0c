"""The ops that read a weight: which argument is the weight, and how a layer call becomes functional.

Layer types are a registry (:data:`LAYERS`): the built-in ``torch.nn`` layers are registered here,
a user's own through :func:`register_layer`; the passes read nothing else. Three spellings of the
same ops reach the passes: ``nn`` layer calls (``call_module``), functional
calls on a Parameter (``F.linear(x, self.w)``) and, in ``torch.export`` graphs, aten ops
(``aten.linear.default``). Every weight is split into rows along its first dim, except where the op
reads the parameter transposed (``addmm(bias, x, W)`` in GPT-2's ``Conv1D``): there a row is one
output, as for a Linear.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightArg", "FUNCTIONS", "LayerSpec", "LAYERS", "register_layer", "weight_arg", "refusal", "padding_row",
           "reads_rows", "layer_arguments", "layer_refusal", "emit_layer_call"]

aten = torch.ops.aten


@dataclass(frozen=True)
class WeightArg:
    """Where an op takes its weight, and what of its other arguments an RPQ weight cannot honour."""

    op: str
    index: int
    keyword: str = "weight"
    transposed: bool = False
    max_norm: int | None = None  # position of a max_norm argument (renormalises the weight in place)
    sparse: int | None = None  # position of a sparse-gradient flag
    padding_idx: int | None = None  # position of a padding_idx argument (a row lookups never train)
    no_padding: int | None = None  # the value of padding_idx that means none (aten spells it -1)


_EMBEDDING = WeightArg("embedding", 1, max_norm=3, sparse=6, padding_idx=2)
FUNCTIONS: dict[Callable, WeightArg] = {
    F.linear: WeightArg("linear", 1),
    F.bilinear: WeightArg("bilinear", 2),
    **{fn: WeightArg(f"conv{n}d", 1) for n, fn in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d))},
    **{fn: WeightArg(f"conv_transpose{n}d", 1)
       for n, fn in ((1, F.conv_transpose1d), (2, F.conv_transpose2d), (3, F.conv_transpose3d))},
    F.embedding: _EMBEDDING,
    F.embedding_bag: WeightArg("embedding_bag", 1, max_norm=3, sparse=7, padding_idx=10),
    torch.addmm: WeightArg("addmm", 2, "mat2", transposed=True),
    aten.linear.default: WeightArg("linear", 1),
    aten.bilinear.default: WeightArg("bilinear", 2),
    aten.conv1d.default: WeightArg("conv1d", 1),
    aten.conv2d.default: WeightArg("conv2d", 1),
    aten.conv3d.default: WeightArg("conv3d", 1),
    aten.convolution.default: WeightArg("convolution", 1),
    aten.conv_transpose1d.default: WeightArg("conv_transpose1d", 1),
    aten.conv_transpose2d.input: WeightArg("conv_transpose2d", 1),
    aten.conv_transpose3d.input: WeightArg("conv_transpose3d", 1),
    aten.embedding.default: WeightArg("embedding", 0, sparse=4, padding_idx=2, no_padding=-1),
    aten.addmm.default: WeightArg("addmm", 2, "mat2", transposed=True),
    aten.embedding_bag.default: WeightArg("embedding_bag", 0, sparse=5),
    aten.embedding_bag.padding_idx: WeightArg("embedding_bag", 0, sparse=5, padding_idx=8),
}

def _arg(node: fx.Node, index: int, keyword: str | None = None, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(keyword, default) if keyword else default


def weight_arg(node: fx.Node, value: fx.Node) -> WeightArg | None:
    """How ``node`` reads ``value`` if it reads it as its weight, else None."""
    spec = FUNCTIONS.get(node.target) if node.op == "call_function" else None
    return spec if spec is not None and _arg(node, spec.index, spec.keyword) is value else None


def _embedding_refusal(max_norm, sparse) -> str | None:
    if max_norm is not None:
        return f"Embedding max_norm={max_norm} renormalises the weight in place, which an RPQ weight cannot be"
    if sparse:
        return "Embedding sparse=True gives sparse gradients, which RPQ codebooks do not take"
    return None


def refusal(node: fx.Node, spec: WeightArg) -> str | None:
    """Why this functional call cannot read an RPQ weight, or None."""
    max_norm = _arg(node, spec.max_norm, "max_norm") if spec.max_norm is not None else None
    sparse = _arg(node, spec.sparse, "sparse", False) if spec.sparse is not None else False
    return _embedding_refusal(max_norm, sparse)


def padding_row(node: fx.Node, spec: WeightArg, num_rows: int) -> int | None:
    """The row an embedding call never trains (its ``padding_idx``, made non-negative), or None."""
    row = _arg(node, spec.padding_idx, "padding_idx", spec.no_padding) if spec.padding_idx is not None else None
    return None if row is None or row == spec.no_padding else row % num_rows


def layer_arguments(module: nn.Module, node: fx.Node) -> dict[str, object]:
    """The arguments of ``module``'s forward in a ``call_module`` node, by name, defaults filled in."""
    bound = inspect.signature(module.forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def layer_refusal(module: nn.Module, arguments: dict[str, object]) -> str | None:
    """Why this call of a built-in layer cannot read an RPQ weight, or None."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return _embedding_refusal(module.max_norm, module.sparse)
    if arguments.get("output_size") is not None:
        return f"{type(module).__name__} called with output_size, which fixes output_padding per call"
    return None


def reads_rows(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s own forward (run by ``functional_call``) reads its tensor ``name`` as an embedding
    table: the ``weight`` of an ``nn.Embedding`` subclass (OPT's positional embedding, which computes its
    positions and ends in ``super().forward``)."""
    return isinstance(module, nn.Embedding) and name == "weight"


@dataclass(frozen=True)
class LayerSpec:
    """How a layer type reads its weight (:func:`register_layer`).

    ``weight``: the name of its weight parameter; ``transposed``: stored ``[in, out]``, its rows
    its columns; ``functional(module, weight, *args, **kwargs)``: the layer's forward on ``args``
    with ``weight`` in place of its own (None: its own forward runs, the expanded weight swapped in
    by ``torch.func.functional_call``). The built-in layers are written out as their torch
    functional op (``F.linear``, ...), which the later passes know; for embeddings,
    ``module.padding_idx`` is a row lookups never train.
    """

    op: str
    weight: str = "weight"
    transposed: bool = False
    functional: Callable | None = None
    builtin: bool = False
    padding: bool = False

    def refusal(self, weight: torch.Tensor) -> str | None:
        """Why ``weight`` cannot be read as this spec says, or None."""
        if self.transposed and weight.dim() != 2:
            return f"registered with rows='last', which needs a 2-D weight, not {list(weight.shape)}"
        return None


LAYERS: dict[type[nn.Module], LayerSpec] = {
    module_type: LayerSpec(op, builtin=True, padding=op.startswith("embedding"))
    for module_type, op in ((nn.Linear, "linear"), (nn.Bilinear, "bilinear"), (nn.Conv1d, "conv1d"),
                            (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.ConvTranspose1d, "conv_transpose1d"),
                            (nn.ConvTranspose2d, "conv_transpose2d"), (nn.ConvTranspose3d, "conv_transpose3d"),
                            (nn.Embedding, "embedding"), (nn.EmbeddingBag, "embedding_bag"))
}
_ROWS = ("first", "last")


def register_layer(module_type: type[nn.Module], *, weight: str = "weight", rows: str = "first",
                   functional: Callable | None = None, op: str | None = None) -> None:
    """Teach rpq_fx a layer type of your own: ``convert`` then stores the parameter named ``weight``
    of every such layer as an RPQ weight, and fx treats the layer as a leaf (it does not trace into it).

    ``rows``: ``"first"`` when each slice along the weight's first dim is one row to quantise
    (``nn.Linear``'s ``[out, in]``, a conv's ``[out, in, *kernel]``), ``"last"`` for a 2-D weight
    stored ``[in, out]`` (GPT-2's ``Conv1D``). ``functional(module, weight, *args, **kwargs)``, if
    given, is the layer's forward with ``weight`` in place of its own (it must not read the module's
    weight attribute): a model captured whole calls it, one node in the graph. Otherwise, and in a
    model converted in place, the layer's own forward runs with the expanded weight swapped in
    (``torch.func.functional_call``). ``op`` names the layer in reports (default: the class name).
    The layer's other parameters stay dense. Registering a type again replaces its entry.
    """
    where = f"register_layer({getattr(module_type, '__name__', module_type)})"
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"{where}: module_type must be a torch.nn.Module subclass, got {module_type!r}")
    if module_type in LAYERS and LAYERS[module_type].builtin:
        raise ValueError(f"{where}: {module_type.__name__} is a built-in layer of rpq_fx; register a subclass instead")
    if not isinstance(weight, str) or not weight.isidentifier():
        raise ValueError(f"{where}: weight must be the name of the layer's weight parameter, got {weight!r}")
    if rows not in _ROWS:
        raise ValueError(f"{where}: rows must be one of {list(_ROWS)}, got {rows!r}")
    if functional is not None and not callable(functional):
        raise TypeError(f"{where}: functional must be None or callable as functional(module, weight, *args), "
                        f"got {functional!r}")
    LAYERS[module_type] = LayerSpec(op or module_type.__name__, weight, rows == "last", functional)


def emit_layer_call(graph: fx.Graph, module: nn.Module, arguments: dict, weight: fx.Node,
                    bias: fx.Node | None) -> fx.Node:
    """Nodes computing a built-in layer's ``module(**arguments)`` with ``weight`` in place of its
    weight, as its torch functional op."""
    op = LAYERS[type(module)].op
    if op == "linear":
        return graph.call_function(F.linear, (arguments["input"], weight, bias))
    if op == "bilinear":
        return graph.call_function(F.bilinear, (arguments["input1"], arguments["input2"], weight, bias))
    if op == "embedding":
        return graph.call_function(F.embedding, (arguments["input"], weight, module.padding_idx, None,
                                                 module.norm_type, module.scale_grad_by_freq, False))
    if op == "embedding_bag":
        return graph.call_function(F.embedding_bag, (
            arguments["input"], weight, arguments["offsets"], None, module.norm_type, module.scale_grad_by_freq,
            module.mode, False, arguments["per_sample_weights"], module.include_last_offset, module.padding_idx))
    x = arguments["input"]
    if op.startswith("conv_transpose"):
        return graph.call_function(getattr(F, op), (x, weight, bias, module.stride, module.padding,
                                                    module.output_padding, module.groups, module.dilation))
    padding = module.padding
    if module.padding_mode != "zeros":
        # reason: torch's convs pad in Python for non-zero modes; the amounts are precomputed on the module
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = 0
    return graph.call_function(getattr(F, op), (x, weight, bias, module.stride, padding, module.dilation,
                                                module.groups))
