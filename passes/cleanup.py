"""Cleanup: drop what the rewrite left unread, check the graph, regenerate the code."""

import torch.fx as fx

__all__ = ["cleanup"]


def _is_impure(node: fx.Node) -> bool:
    # reason: fx's default DCE also drops unread in-place ops (x.add_(y)); only attribute reads are surely pure
    return node.op != "get_attr"


def cleanup(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
