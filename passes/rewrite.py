"""Rewrite: swap each planned weight for an ``RPQWeight`` and each of its uses for an expansion.

Every use gets its own expansion right before it (``get_attr codebooks``, ``get_attr codes``,
``rpq_fx::expand``, and a ``view`` for conv weights), so the dense weight lives only from there
to the op that reads it. A layer module call (``nn.Linear`` …) becomes the functional op, and the
layer itself a plain container of what is left of it: its RPQ ``weight`` and its ``bias``.
"""

import torch
import torch.fx as fx
from torch import nn

from rpq_fx._model import empty_shell
from rpq_fx.graph_module import graphs_of
from rpq_fx.nn.weight import RPQWeight, lookup_weight

from .plan import LayerPlan, parameter_at
from .weight_ops import LAYERS, emit_layer_call, layer_arguments, reads_rows

__all__ = ["rewrite", "new_weights", "is_expansion", "additive_stages", "expansion"]


def new_weights(plans: list[LayerPlan], seed: int = 0) -> dict[str, RPQWeight]:
    """A randomly initialised RPQ weight for every converted plan, by plan name (one generator per
    device, drawn in plan order, so a seed always gives the same weights; torch's global generator
    is not touched). Codebooks train only where the dense weight did (``requires_grad``)."""
    converted = [plan for plan in plans if plan.converted]
    generators = {device: torch.Generator(device).manual_seed(seed)
                  for device in {plan.param.device for plan in converted} if device.type != "meta"}
    weights = {}
    for plan in converted:
        device = plan.param.device
        # reason: RPQWeight's constructor inits itself from the global generator; on the meta device it draws nothing
        settings = plan.settings
        weights[plan.name] = weight = RPQWeight(
            plan.num_codebooks, plan.codebook_dim, plan.rows_shape[0], settings.num_codes, settings.shared_codebooks,
            shape=plan.rows_shape, transposed=plan.transposed, device="meta", hot_rows=plan.hot_rows,
            hot_codebook_dim=settings.hot_codebook_dim if settings.hot_rows else None,
            additive_codebooks=settings.additive_codebooks,
            compute_dtype=plan.dtype if plan.codebook_dtype != plan.dtype else None, dtype=plan.codebook_dtype)
        if device.type != "meta":
            weight.to_empty(device=device)
            embedding = any(op.startswith("embedding") for op in plan.ops)  # torch inits those N(0, 1)
            weight.reset_parameters("normal" if embedding else "uniform", generators[device],
                                    zero_rows=plan.padding_rows)
        weight.requires_grad_(plan.param.requires_grad)
    return weights


def is_expansion(node: fx.Node) -> bool:
    """Whether ``node`` expands an RPQ weight (``rpq_fx::expand``, as :func:`rewrite` writes it)."""
    return node.op == "call_function" and node.target is torch.ops.rpq_fx.expand.default


def additive_stages(expansion: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``(sum, stage expansions)`` where ``expansion`` has additive stages added in (``add`` by ``add``,
    as :func:`rewrite` writes them); ``(expansion, [])`` where it has none."""
    head, stages = expansion, []
    while len(head.users) == 1:
        (user,) = head.users
        if not (user.op == "call_method" and user.target == "add" and len(user.args) == 2 and not user.kwargs
                and user.args[0] is head and isinstance(user.args[1], fx.Node) and is_expansion(user.args[1])
                and len(user.args[1].users) == 1):
            break
        head = user
        stages.append(user.args[1])
    return head, stages


def expansion(graph: fx.Graph, path: str, weight: RPQWeight) -> fx.Node:
    """``get_attr`` codebooks and codes (codebooks cast where stored in another dtype),
    ``rpq_fx::expand``, each additive stage's expansion added (``add``), the hot rows' expansion
    added in (``index_add``), and a view or transpose to the weight's layout."""
    name = path.replace(".", "_")
    codebooks = graph.get_attr(f"{path}.codebooks")
    if weight.dtype != weight.codebooks.dtype:
        codebooks = graph.create_node("call_method", "to", (codebooks, weight.dtype),
                                      name=f"{name}_codebooks_{str(weight.dtype).removeprefix('torch.')}")
    codes = graph.get_attr(f"{path}.codes")
    reshape = "t" if weight.transposed else "view" if len(weight.shape) != 2 else None
    hot = weight.hot is not None
    later = reshape or hot or weight.additive is not None
    rows = graph.create_node("call_function", torch.ops.rpq_fx.expand.default, (codebooks, codes),
                             name=f"{name}_rows" if later else name)
    for m, stage in enumerate(weight.additive or (), 1):
        stage_rows = expansion(graph, f"{path}.additive.{m - 1}", stage)
        last = m == len(weight.additive) and not (reshape or hot)
        rows = graph.create_node("call_method", "add", (rows, stage_rows), name=name if last else f"{name}_rows")
    if hot:
        # reason: stored int32 (half the bytes), read as int64: ONNX's ScatterND, index_add's export, takes no other
        index = graph.create_node("call_method", "long", (graph.get_attr(f"{path}.hot_index"),),
                                  name=f"{name}_hot_index_int64")
        hot_rows = expansion(graph, f"{path}.hot", weight.hot)
        rows = graph.create_node("call_method", "index_add", (rows, 0, index, hot_rows),
                                 name=f"{name}_rows" if reshape else name)
    if reshape is None:
        return rows
    return graph.create_node("call_method", reshape, (rows,) if reshape == "t" else (rows, weight.shape), name=name)


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._parameters:
        del owner._parameters[name]
    owner.add_module(name, module)


def _sites(gm: fx.GraphModule, planned: dict[int, RPQWeight]):
    """``(node, module, None)`` for every call of a module holding a converted weight (a known layer,
    or any other leaf module), ``(node, None, weight)`` for every ``get_attr`` of one."""
    for node in (node for graph in graphs_of(gm) for node in graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if any(id(p) in planned for p in module.parameters()):
                yield node, module, None
        elif node.op == "get_attr" and id(parameter_at(gm, node.target)) in planned:
            yield node, None, planned[id(parameter_at(gm, node.target))]


def _replace_call(node: fx.Node, call: fx.Node) -> None:
    node.replace_all_uses_with(call)
    name = node.name
    node.graph.erase_node(node)
    call.name = name  # reason: the new call keeps the layer's name, so gm.code reads as before


def _container(state: dict[str, nn.Module | torch.Tensor]) -> nn.Module:
    """A plain module holding ``state`` (RPQ weights, parameters, buffers) at their dotted names."""
    container = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        owner = container
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Module):
            owner.register_module(leaf, value)
        elif isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return container


def _read(graph: fx.Graph, path: str, value: nn.Module | torch.Tensor, rows: bool = False) -> fx.Node:
    """A node reading the tensor at ``path``: for an RPQ weight an expansion, or a lookup weight where the reader
    looks up its rows (``rows``: :func:`~.weight_ops.reads_rows`); else a ``get_attr``."""
    if not isinstance(value, RPQWeight):
        return graph.get_attr(path)
    return _lookup(graph, path) if rows else expansion(graph, path, value)


def _lookup(graph: fx.Graph, path: str) -> fx.Node:
    """The RPQ weight at ``path`` as a :class:`~rpq_fx.nn.weight.LookupWeight`: a lookup on it reads only its
    rows (every other use expands it)."""
    return graph.call_function(lookup_weight, (graph.get_attr(path),), name=f"{path.replace('.', '_')}_lookup")


def _rewrite_attribute(gm: fx.GraphModule, node: fx.Node, weight: RPQWeight) -> None:
    """``get_attr`` of a converted parameter: the RPQ weight takes its place, each reader its own expansion
    (a lookup weight where a module's own forward reads it as its embedding table, :func:`~.weight_ops.reads_rows`)."""
    _install(gm, node.target, weight)
    for user in list(node.users):
        rows = user.target is torch.func.functional_call and any(
            value is node and reads_rows(gm.get_submodule(user.args[0].target), name)
            for name, value in user.args[1].items())
        with node.graph.inserting_before(user):
            user.replace_input_with(node, _read(node.graph, node.target, weight, rows))
    node.graph.erase_node(node)


def _rewrite_call(node: fx.Node, module: nn.Module, state: dict[str, nn.Module | torch.Tensor]) -> None:
    """A call of ``module``, whose tensors now sit in a container at its path, reading them from there."""
    graph = node.graph

    def read(name: str, rows: bool = False) -> fx.Node:
        return _read(graph, f"{node.target}.{name}", state[name], rows)

    spec = LAYERS.get(type(module))
    with graph.inserting_before(node):
        if spec is not None and spec.builtin:
            call = emit_layer_call(graph, module, layer_arguments(module, node), read("weight"),
                                   read("bias") if "bias" in state else None)
        elif spec is not None and spec.functional is not None:
            call = graph.call_function(spec.functional, (graph.get_attr(node.target), read(spec.weight), *node.args),
                                       dict(node.kwargs))
        else:
            call = graph.call_function(torch.func.functional_call, (
                graph.get_attr(f"{node.target}.module"),
                {name: read(name, reads_rows(module, name)) for name in state},
                tuple(node.args), dict(node.kwargs)))
    _replace_call(node, call)


def _hold(gm: fx.GraphModule, path: str, module: nn.Module,
          planned: dict[int, RPQWeight]) -> dict[str, nn.Module | torch.Tensor]:
    """Put the RPQ weights of the module at ``path`` in place; returns the tensors its call reads, by name.

    A layer with a functional form keeps its place, its weight swapped for the RPQ weight; any other
    gives way to a container of its tensors (a built-in layer's parameters; every parameter and
    buffer of any other module, which is kept there, emptied of them, as ``module``)."""
    spec = LAYERS.get(type(module))
    if spec is not None and spec.functional is not None:
        weight = planned[id(module.get_parameter(spec.weight))]
        _install(gm, f"{path}.{spec.weight}", weight)
        return {spec.weight: weight}
    builtin = spec is not None and spec.builtin
    tensors = [*module.named_parameters(remove_duplicate=False),
               *(() if builtin else module.named_buffers(remove_duplicate=False))]
    state = {name: planned.get(id(t), t) for name, t in tensors}
    container = _container(state)
    if not builtin:  # the container holds the tensors; the module, emptied, runs its own forward
        container.module = empty_shell(module)
    gm.set_submodule(path, container)
    return state


def rewrite(gm: fx.GraphModule, plans: list[LayerPlan], weights: dict[str, RPQWeight], prefix: str = "") -> None:
    """Rewrite ``gm`` in place (its graph and its modules) to read ``weights`` (by plan name).

    A built-in layer call becomes its functional op, a registered layer with a functional form
    (:func:`~rpq_fx.register_layer`) a call of it; any other leaf module holding a converted weight
    (``nn.MultiheadAttention``, an RNN, timm's no-trace blocks) is called through
    ``torch.func.functional_call`` with the expanded weights, its parameters and buffers moved to
    a container and the module itself kept there, emptied of them, as ``module``. ``prefix`` is
    where ``gm`` sits in the model the plans name (``"encoder.layer.0."``).
    """
    converted = [plan for plan in plans if plan.converted]
    by_alias = {alias: plan for plan in converted for alias in plan.aliases}
    planned = {id(param): weights[by_alias[prefix + name].name]
               for name, param in gm.named_parameters(remove_duplicate=False) if prefix + name in by_alias}
    containers: dict[str, dict[str, nn.Module | torch.Tensor]] = {}
    for node, module, weight in list(_sites(gm, planned)):  # all found before any is rewritten
        if module is None:
            _rewrite_attribute(gm, node, weight)
            continue
        if node.target not in containers:
            containers[node.target] = _hold(gm, node.target, module, planned)
        _rewrite_call(node, module, containers[node.target])
