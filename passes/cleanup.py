"""Cleanup: drop what the rewrite left unread, check each graph, regenerate the code."""

import torch.fx as fx
from torch import nn

from rpq_fx.graph_module import graphs_of

__all__ = ["cleanup"]


def _is_impure(node: fx.Node) -> bool:
    # reason: fx's default DCE also drops unread in-place ops (x.add_(y)); only attribute reads are surely pure
    return node.op != "get_attr"


def _used_module_names(gm: fx.GraphModule) -> set[str]:
    used = set()
    for node in (n for graph in graphs_of(gm) for n in graph.nodes if n.op in ("get_attr", "call_module")):
        parts = node.target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        module = _submodule_or_none(gm, node.target)
        if module is not None:  # a module called, or read whole (functional_call's shell): keep its children
            used.update(f"{node.target}.{name}" for name, _ in module.named_modules() if name)
    return used


def _submodule_or_none(gm: fx.GraphModule, target: str) -> nn.Module | None:
    try:
        return gm.get_submodule(target)
    except AttributeError:
        return None


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    for graph in graphs_of(gm):
        graph.eliminate_dead_code(is_impure_node=_is_impure)
        graph.lint()
    # reason: GraphModule.delete_all_unused_submodules sees only the current graph, not the other mode's
    used = _used_module_names(gm)
    for name in [name for name, _ in gm.named_modules() if name and name not in used]:
        gm.delete_submodule(name)
    gm.recompile()
    return gm
