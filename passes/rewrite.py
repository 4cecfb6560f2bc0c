"""Rewrite: swap each planned weight for an ``RPQWeight`` and each of its uses for an expansion.

Every use gets its own expansion right before it (``get_attr codebooks``, ``get_attr codes``,
``rpq_fx::expand``, and a ``view`` for conv weights), so the dense weight lives only from there
to the op that reads it. A layer module call (``nn.Linear`` …) becomes the functional op, and the
layer itself a plain container of what is left of it: its RPQ ``weight`` and its ``bias``.
"""

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from rpq_fx.graph_module import graphs_of
from rpq_fx.nn.weight import RPQWeight

from .plan import WEIGHT_FUNCTIONS, WEIGHT_MODULES, LayerPlan, parameter_at

__all__ = ["rewrite"]

_FUNCTIONS = {op: fn for fn, op in WEIGHT_FUNCTIONS.items()}


def _new_weight(plan: LayerPlan, generators: dict[torch.device, torch.Generator]) -> RPQWeight:
    device = plan.param.device
    weight = RPQWeight(plan.num_codebooks, plan.codebook_dim, plan.shape[0], plan.num_codes,
                       plan.shared_codebooks, shape=plan.shape, device=device, dtype=plan.dtype)
    if device.type != "meta":
        weight.reset_parameters("normal" if "embedding" in plan.ops else "uniform", generators[device])
    return weight


def _expansion(graph: fx.Graph, path: str, weight: RPQWeight) -> fx.Node:
    codebooks = graph.get_attr(f"{path}.codebooks")
    codes = graph.get_attr(f"{path}.codes")
    name = path.replace(".", "_")
    if len(weight.shape) == 2:
        return graph.create_node("call_function", torch.ops.rpq_fx.expand.default, (codebooks, codes), name=name)
    rows = graph.create_node("call_function", torch.ops.rpq_fx.expand.default, (codebooks, codes),
                             name=f"{name}_rows")
    return graph.create_node("call_method", "view", (rows, weight.shape), name=name)


def _layer_call(graph: fx.Graph, node: fx.Node, module: nn.Module, op: str, weight: fx.Node) -> fx.Node:
    """The functional form of ``module(input)`` with ``weight`` in place of the module's weight."""
    x = node.args[0] if node.args else node.kwargs["input"]
    bias = graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
    if op == "linear":
        return graph.call_function(F.linear, (x, weight, bias))
    if op == "embedding":
        return graph.call_function(F.embedding, (x, weight, module.padding_idx, None, module.norm_type,
                                                 module.scale_grad_by_freq, False))
    padding = module.padding
    if module.padding_mode != "zeros":
        # reason: torch's convs pad in Python for non-zero modes; the amounts are precomputed on the module
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = 0
    return graph.call_function(_FUNCTIONS[op], (x, weight, bias, module.stride, padding, module.dilation,
                                                module.groups))


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._parameters:
        del owner._parameters[name]
    owner.add_module(name, module)


def _sites(gm: fx.GraphModule, planned: dict[int, LayerPlan]):
    """``(node, plan, layer module or None, op)`` for every node that reads a converted weight."""
    for node in (node for graph in graphs_of(gm) for node in graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            op = WEIGHT_MODULES.get(type(module))
            if op is not None and id(module.weight) in planned:
                yield node, planned[id(module.weight)], module, op
        elif node.op == "get_attr" and id(parameter_at(gm, node.target)) in planned:
            yield node, planned[id(parameter_at(gm, node.target))], None, None


def rewrite(gm: fx.GraphModule, plans: list[LayerPlan], seed: int = 0) -> None:
    """Rewrite ``gm`` in place (its graph and its modules) for every converted plan."""
    converted = [plan for plan in plans if plan.converted]
    generators = {device: torch.Generator(device).manual_seed(seed)
                  for device in {plan.param.device for plan in converted} if device.type != "meta"}
    weights = {plan.name: _new_weight(plan, generators) for plan in converted}
    by_alias = {alias: plan for plan in converted for alias in plan.aliases}
    planned = {id(param): by_alias[name] for name, param in gm.named_parameters(remove_duplicate=False)
               if name in by_alias}
    containers: dict[str, nn.Module] = {}
    for node, plan, module, op in list(_sites(gm, planned)):
        weight, graph = weights[plan.name], node.graph
        if module is None:
            _install(gm, node.target, weight)
            for user in list(node.users):
                with graph.inserting_before(user):
                    user.replace_input_with(node, _expansion(graph, node.target, weight))
            graph.erase_node(node)
            continue
        if node.target not in containers:
            containers[node.target] = container = nn.Module()
            container.weight = weight
            if getattr(module, "bias", None) is not None:
                container.bias = module.bias
            gm.set_submodule(node.target, container)
        with graph.inserting_before(node):
            call = _layer_call(graph, node, module, op, _expansion(graph, f"{node.target}.weight", weight))
        node.replace_all_uses_with(call)
        name = node.name
        graph.erase_node(node)
        call.name = name  # reason: the functional call keeps the layer's name, so gm.code reads as before
