"""What a picture of a large model draws: repeated blocks found once, graph nodes mapped to the block
(module) they belong to, and every node of a repeated block's copies mapped to the first copy.

A run is two or more consecutive children ``P.i .. P.j`` of one container (``blocks.0`` ..
``blocks.11``) with the same structure: the same classes, parameter shapes and RPQ settings at every
depth. A picture draws ``P.i`` once and labels it "x12".
"""

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .nn.weight import RPQWeight

__all__ = ["Run", "repeated_runs", "owners", "member_of", "collapse"]


@dataclass(frozen=True)
class Run:
    """Children ``container.first`` .. ``container.last`` (indices), all built alike."""

    container: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def member(self, index: int) -> str:
        return f"{self.container}.{index}" if self.container else str(index)

    @property
    def label(self) -> str:
        return f"{self.member(self.first)} .. {self.member(self.last)}"


def _signature(module: nn.Module) -> tuple:
    if isinstance(module, RPQWeight):
        return ("RPQWeight", tuple(module.shape), module.num_codebooks, module.num_codes, module.codebook_dim)
    own = tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False))
    return (type(module).__name__, own, tuple((name, _signature(child)) for name, child in module.named_children()))


def repeated_runs(model: nn.Module) -> list[Run]:
    """Every run of two or more alike consecutive children named by integers, outermost first (a run
    inside a run's first member is found too; inside its other members it is not needed)."""
    runs = []
    for path, module in model.named_modules():
        children = [(int(name), child) for name, child in module.named_children() if name.isdigit()]
        start = 0
        while start < len(children):
            end = start
            signature = _signature(children[start][1])
            while end + 1 < len(children) and children[end + 1][0] == children[end][0] + 1 and \
                    _signature(children[end + 1][1]) == signature:
                end += 1
            if end > start:
                runs.append(Run(path, children[start][0], children[end][0]))
            start = end + 1
    return runs


def _weight_owner(gm: fx.GraphModule, target: str) -> str:
    """The module a ``get_attr`` target belongs to: the layer, for an RPQ weight's codebooks / codes."""
    path = target.rpartition(".")[0]
    try:
        if isinstance(gm.get_submodule(path), RPQWeight):
            return path.rpartition(".")[0]
    except AttributeError:
        pass
    return path


def owners(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """The module path each node belongs to: the innermost module the tracer recorded it in, else the
    layer whose weight it reads (the expansion and the op a rewrite put in a layer's place)."""
    owner: dict[fx.Node, str] = {}
    from_weight: set[fx.Node] = set()
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            owner[node] = _weight_owner(gm, node.target)
            from_weight.add(node)
        elif node.op == "call_module":
            owner[node] = node.target
        elif stack:
            owner[node] = next(reversed(stack.values()))[0]
        elif inputs and all(a in from_weight for a in inputs):
            owner[node] = owner[inputs[0]]
            from_weight.add(node)
        else:
            weighted = [a for a in inputs if a in from_weight]
            owner[node] = owner[weighted[0]] if weighted else owner.get(inputs[0], "") if inputs else ""
    return owner


def _shape(node: fx.Node, member: str) -> tuple:
    target = node.target
    if isinstance(target, str) and target.startswith(f"{member}."):
        target = target[len(member):]
    return node.op, str(target), len(node.all_input_nodes)


def member_of(path: str, run: Run) -> int | None:
    prefix = f"{run.container}." if run.container else ""
    if not path.startswith(prefix):
        return None
    head = path[len(prefix):].partition(".")[0]
    return int(head) if head.isdigit() and run.first <= int(head) <= run.last else None


def collapse(gm: fx.GraphModule) -> tuple[dict[fx.Node, fx.Node], list[Run]]:
    """``(representative, runs)``: each node mapped to itself or, inside a later copy of a repeated
    block, to the same node of the first copy; the runs collapsed (those whose copies' graphs match
    node for node: a block that traces differently per copy is drawn in full)."""
    owner = owners(gm)
    representative = {node: node for node in gm.graph.nodes}
    collapsed = []
    for run in repeated_runs(gm):
        members: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if representative[node] is not node:
                continue  # inside a run collapsed already (an outer one)
            index = member_of(owner[node], run)
            if index is not None:
                members.setdefault(index, []).append(node)
        first = members.get(run.first, [])
        shapes = [_shape(n, run.member(run.first)) for n in first]
        if not first or len(members) != run.count or any(
                [_shape(n, run.member(i)) for n in nodes] != shapes for i, nodes in members.items()):
            continue
        for index, nodes in members.items():
            for node, kept in zip(nodes, first):
                representative[node] = kept
        collapsed.append(run)
    return representative, collapsed
