"""Fuse: compute converted linear and embedding layers in the compressed domain.

After :func:`rewrite`, every use of an RPQ weight is ``rpq_fx::expand(codebooks, codes)`` feeding the
op that reads it. Where that op is a linear layer (``F.linear``, ``aten.linear``, or ``addmm`` reading
the transposed weight, as GPT-2's ``Conv1D`` does), the pair becomes one ``rpq_fx::linear`` node,
which picks per call between computing from codebooks and codes directly (the dense weight is
never built) and expanding; where it is an embedding lookup, one ``rpq_fx::embedding`` node,
which expands only the looked-up rows::

    fc1_weight = torch.ops.rpq_fx.expand.default(fc1_weight_codebooks, fc1_weight_codes)
    fc1 = torch._C._nn.linear(x, fc1_weight, fc1_bias)
        ->
    fc1 = torch.ops.rpq_fx.linear.default(x, fc1_weight_codebooks, fc1_weight_codes, fc1_bias)

An embedding whose weight has hot rows (``expand(...).index_add(0, hot_index, hot expansion)``)
becomes ``rpq_fx::embedding`` plus :func:`rpq_fx.ops.hot_embedding`, the looked-up hot rows'
residuals; a linear layer with hot rows keeps its expansion.

A weight with additive stages (``expand(...).add(expand(...))``, one ``add`` per stage) becomes one
fused node per stage, summed (the ops are linear in the weight; the bias goes to the first); its
hot rows, if any, are added as above.

A convolution (``F.conv1d/2d/3d``, their aten ops, ``aten.convolution`` not transposed) reading
``expand(...).view(shape)`` becomes one ``rpq_fx::conv`` node, which expands the weight a block of output
channels at a time (:mod:`rpq_fx.ops.conv`), or computes a pointwise one in the compressed domain, where either
pays (:func:`~rpq_fx.ops.conv.fused_pays`: a weight bigger than one block, a 1x1 convolution whose codes save
enough products, or a strided 1x1 one); another, or one with hot rows or additive stages, keeps its expansion::

    conv_weight = torch.ops.rpq_fx.expand.default(conv_weight_codebooks, conv_weight_codes).view((512, 512, 3, 3))
    conv = torch.conv2d(x, conv_weight, None, 1, 1, 1, 1)
        ->
    conv = torch.ops.rpq_fx.conv.default(x, conv_weight_codebooks, conv_weight_codes, None, [512, 512, 3, 3],
                                         [1, 1], [1, 1], [1, 1], 1)

An expansion is fused only when that op is its one user and reads it as its weight. Fused nodes
hold no dense weight for backward, so the checkpoint pass (which wraps ``rpq_fx::expand`` nodes
only) leaves them alone.
"""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from rpq_fx.graph_module import graphs_of
from rpq_fx.ops import hot_embedding
from rpq_fx.ops.conv import fused_pays

from .rewrite import additive_stages, is_expansion

__all__ = ["fuse"]

aten = torch.ops.aten
_LINEAR = torch.ops.rpq_fx.linear.default
_EMBEDDING = torch.ops.rpq_fx.embedding.default
_CONV = torch.ops.rpq_fx.conv.default

# name, positional order and defaults of each op that can be fused
_SIGNATURES = {
    F.linear: (("input", "weight", "bias"), {"bias": None}),
    aten.linear.default: (("input", "weight", "bias"), {"bias": None}),
    torch.addmm: (("input", "mat1", "mat2"), {"beta": 1, "alpha": 1}),
    aten.addmm.default: (("input", "mat1", "mat2"), {"beta": 1, "alpha": 1}),
    F.embedding: (("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                  {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False,
                   "sparse": False}),
    aten.embedding.default: (("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse"),
                             {"padding_idx": -1, "scale_grad_by_freq": False, "sparse": False}),
}
_KEYWORD_ONLY = {"beta", "alpha"}

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
# conv op -> its arguments by position, defaults
_CONVS = {**{op: (_CONV_ARGS, _CONV_DEFAULTS) for op in (F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default,
                                                           aten.conv2d.default, aten.conv3d.default)},
          aten.convolution.default: (_CONVOLUTION_ARGS, {})}


def _bind(node: fx.Node) -> dict | None:
    """The call's arguments by name, defaults filled in, or None if they do not fit the signature."""
    names, defaults = _SIGNATURES[node.target]
    if len(node.args) > len(names):
        return None
    bound = {**defaults, **dict(zip(names, node.args))}
    for key, value in node.kwargs.items():
        if (key not in names and key not in _KEYWORD_ONLY) or key in names[:len(node.args)]:
            return None
        bound[key] = value
    return bound if all(name in bound for name in names) else None


def _shape(gm: fx.GraphModule, node) -> tuple[int, ...] | None:
    """The static shape of a graph value, where the graph knows it (an attribute, or export's meta)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _hot_part(expansion: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(index_add, hot_index, hot expansion)`` where ``expansion`` is a weight with hot rows added in."""
    if len(expansion.users) != 1:
        return None
    (user,) = expansion.users
    if user.op == "call_method" and user.target == "index_add" and user.args[:2] == (expansion, 0):
        return user, user.args[2], user.args[3]
    return None


def _fused_call(gm: fx.GraphModule, first: fx.Node, expansion: fx.Node,
                hot: tuple | None) -> tuple[fx.Node, object, tuple] | None:
    """``(node replaced, op, args)`` of the fused node (the first stage's, where the weight has additive
    stages), or None where the expansion's use cannot be fused; ``first``: the first stage's ``rpq_fx::expand``,
    ``expansion``: the weight before hot rows (``first``, or the sum of the stages), ``hot``: :func:`_hot_part`
    of ``expansion``."""
    codebooks, codes = first.args
    if len(expansion.users) != 1:
        return None
    weight = expansion
    if hot is not None:  # reason: only an embedding reads a weight with hot rows in the compressed domain
        weight = hot[0]
        if len(weight.users) != 1:
            return None
        (user,) = weight.users
        if user.target not in (F.embedding, aten.embedding.default):
            return None
    (user,) = weight.users
    if user.op == "call_method" and user.target == "t" and user.args == (expansion,) and len(user.users) == 1:
        # reason: addmm(bias, x, W.t()) is GPT-2 Conv1D's linear (rows of W are still output neurons)
        weight, (user,) = user, user.users
        if user.op != "call_function" or user.target not in (torch.addmm, aten.addmm.default):
            return None
    if user.op != "call_function" or user.target not in _SIGNATURES:
        return None
    args = _bind(user)
    if args is None:
        return None
    others = [v for k, v in args.items() if k not in ("weight", "mat2")]
    if any(v is weight or v is expansion for v in others):
        return None
    if user.target in (F.linear, aten.linear.default):
        if args["weight"] is not expansion:
            return None
        return user, _LINEAR, (args["input"], codebooks, codes, args["bias"])
    if user.target in (torch.addmm, aten.addmm.default):
        bias = args["input"]
        if (weight is expansion or args["mat2"] is not weight or args["beta"] != 1 or args["alpha"] != 1
                or _shape(gm, bias) != (_shape(gm, codes) or (None, None))[1:]):
            return None  # reason: only bias + x @ W.T with a [N] bias is a linear layer
        return user, _LINEAR, (args["mat1"], codebooks, codes, bias)
    if user.target is F.embedding:
        if (args["weight"] is not weight or args["max_norm"] is not None or args["sparse"] is not False
                or not isinstance(args["padding_idx"], (int, type(None)))
                or not isinstance(args["scale_grad_by_freq"], bool)):
            return None  # reason: max_norm renormalises the weight in place; sparse grads have no RPQ form
        return user, _EMBEDDING, (args["input"], codebooks, codes, args["padding_idx"], args["scale_grad_by_freq"])
    if (args["weight"] is not weight or args["sparse"] is not False or not isinstance(args["padding_idx"], int)
            or not isinstance(args["scale_grad_by_freq"], bool)):
        return None
    padding_idx = None if args["padding_idx"] == -1 else args["padding_idx"]  # reason: aten spells "none" -1
    return user, _EMBEDDING, (args["indices"], codebooks, codes, padding_idx, args["scale_grad_by_freq"])


def _dtype(gm: fx.GraphModule, node) -> torch.dtype | None:
    """The dtype of the codebooks an expansion reads (a ``get_attr``, or its ``.to(dtype)``), where known."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and len(node.args) == 2 \
            and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
        return value.dtype if isinstance(value, torch.Tensor) else None
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _ints(value, dims: int) -> list[int] | None:
    """A conv's stride / padding / dilation as ``dims`` ints, or None (a string padding, a graph value)."""
    values = [value] * dims if isinstance(value, int) else list(value) if isinstance(value, (tuple, list)) else None
    ok = values is not None and len(values) == dims and all(isinstance(v, int) and not isinstance(v, bool)
                                                             for v in values)
    return values if ok else None


def _conv_call(gm: fx.GraphModule, expansion: fx.Node) -> tuple[fx.Node, tuple] | None:
    """``(conv node, rpq_fx::conv args)`` where ``expansion``'s one use is ``view(shape)`` read as the weight of
    one convolution that pays for ``rpq_fx::conv`` (:func:`~rpq_fx.ops.conv.fused_pays`), else None."""
    if len(expansion.users) != 1:
        return None
    (view,) = expansion.users
    if not (view.op == "call_method" and view.target == "view" and len(view.args) == 2 and not view.kwargs
            and view.args[0] is expansion and len(view.users) == 1):
        return None
    shape = view.args[1]
    if not (isinstance(shape, (tuple, list)) and 3 <= len(shape) <= 5 and all(type(s) is int for s in shape)):
        return None
    (user,) = view.users
    if user.op != "call_function" or user.target not in _CONVS:
        return None
    names, defaults = _CONVS[user.target]
    if len(user.args) > len(names) or any(key not in names[len(user.args):] for key in user.kwargs):
        return None
    args = {**defaults, **dict(zip(names, user.args)), **user.kwargs}
    if any(name not in args for name in names) or args["weight"] is not view:
        return None
    if any(v is view for k, v in args.items() if k != "weight"):
        return None
    if args.get("transposed", False) is not False or any(args.get("output_padding", [0])):
        return None
    dims = len(shape) - 2
    stride, padding, dilation = (_ints(args[k], dims) for k in ("stride", "padding", "dilation"))
    codebooks, codes = expansion.args
    dtype = _dtype(gm, codebooks)
    if (None in (stride, padding, dilation, dtype) or type(args["groups"]) is not int
            or not fused_pays(shape, dtype, stride, padding, args["groups"], _shape(gm, codebooks))):
        return None
    return user, (args["input"], codebooks, codes, args["bias"], list(shape), stride, padding, dilation,
                  args["groups"])


def _fuse_conv(graph: fx.Graph, expansion: fx.Node, user: fx.Node, args: tuple) -> None:
    """Replace ``user`` (a conv reading ``expansion.view(shape)``) with one ``rpq_fx::conv`` node."""
    (view,) = expansion.users
    with graph.inserting_before(user):
        new = graph.call_function(_CONV, args)
    new.meta.update(user.meta)
    user.replace_all_uses_with(new)
    name = user.name
    for node in (user, view, expansion):
        graph.erase_node(node)
    new.name = name  # reason: the fused call keeps the layer's name, so gm.code reads as before


def _fusable(gm: fx.GraphModule, expansion: fx.Node,
             hot: tuple | None) -> tuple[fx.Node, object, tuple] | None:
    """:func:`_fused_call` of the first stage ``expansion``, but not for a weight with hot rows whose lookup
    scales gradients by frequency (the hot rows' residuals are added as they are) or whose row count the
    graph does not know."""
    head, _ = additive_stages(expansion)
    call = _fused_call(gm, expansion, head, hot)
    if call is None or hot is None:
        return call
    _, _, (_, _, codes, _, scale_grad_by_freq) = call
    return None if scale_grad_by_freq or _shape(gm, codes) is None else call


def fuse(gm: fx.GraphModule) -> int:
    """Fuse every expansion read by one linear / embedding op or convolution that pays, in every graph of
    ``gm``, in place; returns how many were fused."""
    fused = 0
    for graph in graphs_of(gm):
        stage_expansions = set()
        for expansion in [n for n in graph.nodes if is_expansion(n)]:
            if expansion in stage_expansions:
                continue
            head, stages = additive_stages(expansion)
            stage_expansions.update(stages)
            hot = _hot_part(head)
            conv = None if stages or hot is not None else _conv_call(gm, expansion)
            if conv is not None:
                _fuse_conv(graph, expansion, *conv)
                fused += 1
                continue
            call = _fusable(gm, expansion, hot)
            if call is None:
                continue
            user, op, args = call
            with graph.inserting_before(user):
                new = graph.call_function(op, args)
                if stages:
                    new.name = f"{user.name}_stage_0"
                for m, stage in enumerate(stages, 1):  # the op is linear in the weight: one call per stage; bias once
                    rest = (None,) if op is _LINEAR else args[3:]
                    stage_call = graph.call_function(op, (args[0], *stage.args, *rest))
                    stage_call.name = f"{user.name}_stage_{m}"
                    new = graph.call_function(operator.add, (new, stage_call))
                if hot is not None:  # the looked-up hot rows' residuals, added
                    _, index, hot_expansion = hot
                    new.name = f"{user.name}_rows"
                    rows = graph.call_function(hot_embedding, (args[0], *hot_expansion.args, index,
                                                               _shape(gm, args[2])[1]))
                    rows.name = f"{user.name}_hot_rows"
                    new = graph.call_function(operator.add, (new, rows))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            name = user.name
            parts = (expansion, *stages, *(add for stage in stages for add in stage.users), *head.users,
                     *(() if hot is None else hot[2:]))
            dead = [user]
            while dead:
                node = dead.pop()
                inputs = node.all_input_nodes
                graph.erase_node(node)
                dead.extend(n for n in inputs if n in parts and not n.users)
            new.name = name  # reason: the fused call keeps the layer's name, so gm.code reads as before
            fused += 1
    if fused:
        gm.recompile()
    return fused
