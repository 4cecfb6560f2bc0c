"""Checkpoints written before lookup weights: what they recorded for a weight now read through a ``LookupWeight``.

Since 2026-12-06 (commit 6ec7b69) an ``nn.Embedding`` subclass run by its own forward (``functional_call``, OPT's
positional embedding) gets its RPQ weight as a :class:`~rpq_fx.nn.weight.LookupWeight` (one ``lookup_weight`` node),
where rpq_fx wrote the weight's expansion before (``rpq_fx::expand`` ..., checkpointed with ``checkpoint=True``);
since ec0be8d its plan also gets the layer's ``padding_idx`` as a padding row. Both compute the same: a lookup on the
LookupWeight equals the lookup on the expansion, and the padding row only decides how a weight is initialised and
fitted, never what a saved one computes. :func:`rpq_fx.load` compares a file that has no ``lookup_weight`` node in
its saved forward (written before) with this model as rpq_fx wrote it then: :func:`graph_before_lookups`,
:func:`padding_rows_before_lookups`.
"""

import copy
import re
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .graph_module import graph_parts, graphs_of
from .nn.weight import lookup_weight
from .passes import LayerPlan, insert_checkpoints
from .passes.rewrite import expansion

__all__ = ["written_before_lookups", "graph_before_lookups", "padding_rows_before_lookups"]

# fx writes a call of rpq_fx.nn.weight.lookup_weight as ``rpq_fx_nn_weight_lookup_weight(...)``
_LOOKUP_CALL = re.compile(r"lookup_weight\(")


def _is_lookup(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is lookup_weight


def written_before_lookups(saved_codes: dict[str, str]) -> bool:
    """Whether a checkpoint's saved forwards (its ``code``) were written before lookup weights: none calls one."""
    return not any(_LOOKUP_CALL.search(code) for code in saved_codes.values())


def graph_before_lookups(part: fx.GraphModule, graph: fx.Graph, checkpoint: bool) -> fx.Graph:
    """``graph`` (one of ``part``'s) as rpq_fx wrote it before lookup weights: where it hands a layer's own forward a
    LookupWeight, a copy with the weight's expansion there instead (the rewrite pass's own), checkpointed with its
    consumer where the model was converted with ``checkpoint=True``. ``part`` and ``graph`` are not modified."""
    if not any(_is_lookup(node) for node in graph.nodes):
        return graph
    # reason: a module over a copy: the checkpoint pass adds its submodules to it, not to ``part``
    holder = fx.GraphModule(part, copy.deepcopy(graph))
    for node in [n for n in holder.graph.nodes if _is_lookup(n)]:
        attribute = node.args[0]
        with holder.graph.inserting_before(node):
            rows = expansion(holder.graph, attribute.target, holder.get_submodule(attribute.target))
        node.replace_all_uses_with(rows)
        holder.graph.erase_node(node)
        if not attribute.users:
            holder.graph.erase_node(attribute)
    if checkpoint:
        insert_checkpoints(holder)
    return holder.graph


def padding_rows_before_lookups(model: nn.Module, layers: Sequence[LayerPlan]) -> dict[str, set[int]]:
    """``{plan name: rows}``: the padding rows the plan (one of ``layers``) of each weight of ``model`` read through a
    LookupWeight got from the layer's own forward (its ``padding_idx``), which the plan before lookup weights did
    not give it."""
    names = {alias: layer.name for layer in layers for alias in layer.aliases}
    rows: dict[str, set[int]] = {}
    for name, part in graph_parts(model):
        for node in (n for graph in graphs_of(part) for n in graph.nodes if _is_lookup(n)):
            path = f"{name}.{node.args[0].target}" if name else node.args[0].target
            for user in node.users:
                layer = part.get_submodule(user.args[0].target) if user.target is torch.func.functional_call else None
                if isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
                    rows.setdefault(names.get(path, path), set()).add(layer.padding_idx)
    return rows
