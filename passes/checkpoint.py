"""Checkpoint: wrap each expansion, with the op that reads it, in activation checkpointing.

The region ``expand → (additive stages' expand and add) → (view) → op`` becomes a small GraphModule
called through non-reentrant ``torch.utils.checkpoint.checkpoint``: backward recomputes the dense
weight instead of keeping it.
"""

import torch
import torch.fx as fx
import torch.utils.checkpoint
from torch import nn

from rpq_fx.graph_module import graphs_of

from .rewrite import additive_stages, is_expansion

__all__ = ["insert_checkpoints"]


def _chain(expand: fx.Node) -> list[fx.Node]:
    """``[expand]``, its additive stages' expansions and sums if it has any, then the ``view`` / ``t``
    where the weight is reshaped for its op."""
    head, stages = additive_stages(expand)
    chain = [expand, *(node for stage in stages for node in (stage, *stage.users))]
    users = list(head.users)
    return [*chain, users[0]] if len(users) == 1 and users[0].target in ("view", "t") else chain


def _regions(expansions: list[fx.Node]) -> list[list[fx.Node]]:
    """Per op reading expanded weights (a layer reads one; ``functional_call`` of a leaf, several):
    the chains of those expansions, then the op. Expansions read by more than one op are left out."""
    chains: dict[fx.Node, list[fx.Node]] = {}
    stages = {stage for expand in expansions for stage in additive_stages(expand)[1]}
    for expand in (expand for expand in expansions if expand not in stages):
        chain = _chain(expand)
        if len(chain[-1].users) == 1:
            chains.setdefault(next(iter(chain[-1].users)), []).extend(chain)
    return [[*chain, consumer] for consumer, chain in chains.items()]


def _inputs(region: list[fx.Node]) -> list[fx.Node]:
    inside = set(region)
    return list(dict.fromkeys(arg for node in region for arg in node.all_input_nodes if arg not in inside))


def _free_name(gm: fx.GraphModule, name: str) -> str:
    candidates = (name if i == 0 else f"{name}_{i}" for i in range(len(gm._modules) + 1))
    return next(c for c in candidates if not hasattr(gm, c))


def insert_checkpoints(gm: fx.GraphModule) -> int:
    """Checkpoint every expansion region of ``gm`` (each of its graphs) in place; returns how many."""
    expansions = [n for graph in graphs_of(gm) for n in graph.nodes if is_expansion(n)]
    regions = _regions(expansions)
    for region in regions:
        consumer, inputs, graph = region[-1], _inputs(region), region[0].graph
        body = fx.Graph()
        env = {node: body.placeholder(node.name) for node in inputs}
        for node in region:
            env[node] = body.node_copy(node, env.__getitem__)
        body.output(env[consumer])
        name = _free_name(gm, f"{consumer.name}_checkpoint")
        gm.add_submodule(name, fx.GraphModule(nn.Module(), body, class_name="CheckpointedExpansion"))
        with graph.inserting_before(consumer):
            call = graph.call_function(torch.utils.checkpoint.checkpoint,
                                       (graph.get_attr(name), *inputs), {"use_reentrant": False})
        consumer.replace_all_uses_with(call)
        consumer_name = consumer.name
        for node in reversed(region):
            graph.erase_node(node)
        call.name = consumer_name  # reason: keep the layer's name in gm.code
    return len(regions)
