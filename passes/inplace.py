"""In-place adds: ``a + b`` computed into ``a`` where nothing else can see ``a``.

Python's ``x += shortcut`` (timm's residual blocks) is traced by torch.fx as an out-of-place ``operator.add``:
``fx.Proxy`` has no ``__iadd__``, so Python falls back to ``__add__``, and the graph no longer says which adds
were in place. The converted model then allocates a fresh activation per block where the original wrote into
one: timm resnet50 at batch 32 spent 141 ms in ``aten::add`` against the dense model's 20 ms in ``aten::add_``
(benchmarks/results/model_speed.md).

This pass rewrites an add the trace cannot tell from ``+=`` and whose in-place form nothing can observe::

    add = layer1_0_bn3 + layer1_0_downsample_1
        ->
    add = rpq_fx_passes_inplace_add_into(layer1_0_bn3, layer1_0_downsample_1)

Statically (here) the left operand ``a`` must be read by this add alone, and come from a call known to return a
fresh tensor (:data:`FRESH_MODULES`, :data:`FRESH_FUNCTIONS`: never a graph input, attribute, parameter, buffer
or a view of one); a module that produces it must have no forward hooks when the pass runs (a hook could keep
its output). At run time :func:`add_into` adds in place only where that gives exactly ``a + b``: ``a`` and
``b`` tensors (or ``b`` a number), the broadcast shape ``a``'s own and the promoted dtype ``a``'s, and no autograd
recording through either (``torch.is_grad_enabled()`` and ``requires_grad``: an in-place op on a tensor saved for
backward would raise or be wrong); else it returns ``a + b``. So training computes what it did, and inference
(``torch.no_grad`` / ``torch.inference_mode``) writes into ``a``.

A hook added after conversion to a module whose output feeds such an add sees that output with ``b`` added
(as a hook on the original's ``x += shortcut`` would).
"""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from rpq_fx.graph_module import graphs_of
from rpq_fx.nn.layers import RPQ_LAYERS

__all__ = ["inplace_adds", "add_into", "FRESH_MODULES", "FRESH_FUNCTIONS"]

# Modules whose forward returns a tensor it allocated (by exact type: a subclass may return its input)
FRESH_MODULES = frozenset({nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                           nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, *RPQ_LAYERS.values()})
_rpq = torch.ops.rpq_fx
_aten = torch.ops.aten
_ADDS = (operator.add, torch.add)


def add_into(a, b):
    """``a + b``, written into ``a`` where that is the same tensor value and no autograd records through it."""
    proxy = next((v for v in (a, b) if isinstance(v, fx.Proxy)), None)
    if proxy is not None:
        # reason: fx re-traces a GraphModule's code when unpickling it; record this call, not the ops of one branch
        return proxy.tracer.create_proxy("call_function", add_into, (a, b), {})
    if (isinstance(a, Tensor) and not (torch.is_grad_enabled() and (a.requires_grad or getattr(b, "requires_grad",
                                                                                                    False)))
            and _fits(a, b) and torch.result_type(a, b) == a.dtype):
        return a.add_(b)
    return a + b


# Functions that return a fresh tensor given tensors (rpq_fx's ops are custom ops: an output never aliases an input;
# add_into returns its left operand, fresh where it rewrites, or a fresh sum)
FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, torch.add, torch.sub, torch.mul,
    torch.matmul, torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm,
    F.layer_norm, F.group_norm, _rpq.linear.default, _rpq.conv.default, _rpq.embedding.default,
    _aten.convolution.default, _aten.linear.default, _aten.addmm.default, add_into})


def _fits(a: Tensor, b) -> bool:
    """Whether ``b`` (a number or a tensor) broadcasts to ``a``'s shape, so that ``a + b`` has it."""
    if isinstance(b, (int, float, bool)):
        return True
    if not isinstance(b, Tensor):
        return False
    # reason: torch.broadcast_shapes took 9 us a call, a fifth of a residual add at batch 1
    return b.dim() <= a.dim() and all(m == 1 or m == n for m, n in zip(reversed(b.shape), reversed(a.shape)))


def _fresh(gm: fx.GraphModule, node) -> bool:
    """Whether ``node`` is a call that returns a tensor it allocated, with no forward hook that could keep it."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in FRESH_FUNCTIONS
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return (type(module) in FRESH_MODULES and not module._forward_hooks
            and not nn.modules.module._global_forward_hooks)


def _rewritable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An out-of-place ``a + b`` (no ``alpha``, no ``out``) whose left operand only it reads and is fresh."""
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    return _fresh(gm, a) and a is not b and len(a.users) == 1


def inplace_adds(gm: fx.GraphModule) -> int:
    """Rewrite every add of ``gm``'s graphs that qualifies (the module docstring) to :func:`add_into`, in place;
    returns how many."""
    count = 0
    for graph in graphs_of(gm):
        for node in [n for n in graph.nodes if _rewritable(gm, n)]:
            node.target = add_into
            count += 1
    if count:
        gm.recompile()
    return count
