"""Plan: find every parameter used as a layer weight in a captured graph and decide its fate.

Nothing is changed here. A parameter is keyed by identity, so a shared module or a tied weight
(one Parameter under several names) is planned once, with all its names.
"""

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from rpq_fx.config import LayerSettings, RPQConfig
from rpq_fx.errors import RPQConversionError
from rpq_fx.graph_module import graphs_of
from rpq_fx.record import LayerPlan

from .weight_ops import LAYERS, layer_arguments, layer_refusal, padding_row, reads_rows, refusal, weight_arg

__all__ = ["LayerPlan", "plan_conversion", "check_strict", "parameter_at"]


@dataclass
class _Uses:
    ops: list[str] = field(default_factory=list)  # weight ops that read the parameter
    others: list[str] = field(default_factory=list)  # anything else that reads it
    layers: dict[str, nn.Module] = field(default_factory=dict)  # the nn layers calling it as their weight
    functional: bool = False  # read directly by a functional op (F.linear(x, self.w))
    transposed: set[bool] = field(default_factory=set)  # how the weight ops read it: as W, as W.T
    padding_rows: set[int] = field(default_factory=set)
    refusal: str | None = None  # a use that makes conversion wrong


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _mutates(node: fx.Node) -> bool:
    """Whether ``node`` may write into its inputs (``x.add_(y)``, ``aten.embedding_renorm_``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    return node.op in ("call_method", "call_function") and _target_name(node).endswith("_")


def _layer_use(module: nn.Module, name: str, node: fx.Node, uses: dict[int, _Uses]) -> None:
    """Add a call of a registered layer (``weight_ops.LAYERS``) to ``uses``: its weight, read as its spec says."""
    spec = LAYERS[type(module)]
    weight = module._parameters.get(spec.weight)
    if weight is None:
        raise RPQConversionError(f"'{name}': {type(module).__name__} is registered with weight={spec.weight!r}, "
                                 f"but has no such parameter (it has {list(module._parameters)})")
    use = uses.setdefault(id(weight), _Uses())
    use.ops.append(spec.op)
    use.layers[name] = module
    use.transposed.add(spec.transposed)
    refusal = layer_refusal(module, layer_arguments(module, node)) if spec.builtin else spec.refusal(weight)
    use.refusal = use.refusal or refusal
    if spec.padding and module.padding_idx is not None:
        use.padding_rows.add(module.padding_idx)
    for other in () if spec.builtin else module.parameters():
        if other is not weight:
            _not_a_weight(uses, other, type(module).__name__)


def _not_a_weight(uses: dict[int, _Uses], param: nn.Parameter, layer: str) -> None:
    """A registered layer reads ``param`` other than as its weight: it stays dense, and says why."""
    use = uses.setdefault(id(param), _Uses())
    use.others.append(f"read by {layer}, not as its weight")
    use.refusal = use.refusal or f"read by {layer} other than as its weight"


def _own_forward_use(use: _Uses, layer: nn.Module, name: str) -> None:
    """``layer``'s own forward reads its tensor ``name`` (through ``functional_call``): an ``nn.Embedding``
    subclass's weight is its table (read through a ``LookupWeight``), with the built-in layer's padding row and
    refusals (``max_norm``, ``sparse``)."""
    if reads_rows(layer, name):
        use.refusal = use.refusal or layer_refusal(layer, {})
        if layer.padding_idx is not None:
            use.padding_rows.add(layer.padding_idx)


def _collect_uses(gm: fx.GraphModule, prefix: str, uses: dict[int, _Uses]) -> None:
    """Add how ``gm`` (the part of the model at ``prefix``) reads each parameter to ``uses``."""
    for node in (node for graph in graphs_of(gm) for node in graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module) in LAYERS:
                _layer_use(module, prefix + node.target, node, uses)
                continue
            for name, param in module.named_parameters():  # any other leaf: run through torch.func.functional_call
                if param.dim() >= 2:
                    use = uses.setdefault(id(param), _Uses())
                    use.ops.append(type(module).__name__)
                    use.layers[prefix + node.target] = module
                    use.transposed.add(False)
                    _own_forward_use(use, module, name)
        elif node.op == "get_attr":
            value = parameter_at(gm, node.target)
            if value is None:
                continue
            use = uses.setdefault(id(value), _Uses())
            for user in node.users:
                spec = weight_arg(user, node)
                if spec is not None:
                    use.ops.append(spec.op)
                    use.functional = True
                    use.transposed.add(spec.transposed)
                    use.refusal = use.refusal or refusal(user, spec)
                    row = padding_row(user, spec, value.shape[0])
                    use.padding_rows.update(() if row is None else (row,))
                elif user.target is torch.func.functional_call and node in user.args[1].values():
                    layer = gm.get_submodule(user.args[0].target)  # capture_call's layer
                    spec = LAYERS.get(type(layer))
                    if spec is not None and node is not user.args[1].get(spec.weight):
                        _not_a_weight(uses, value, type(layer).__name__)
                        continue
                    use.ops.append(type(layer).__name__ if spec is None else spec.op)
                    use.functional = True
                    use.transposed.add(spec is not None and spec.transposed)
                    use.refusal = use.refusal or (spec.refusal(value) if spec is not None else None)
                    if spec is None:
                        _own_forward_use(use, layer, next(n for n, v in user.args[1].items() if v is node))
                else:
                    use.others.append(f"used by {_target_name(user)}")
                    if _mutates(user):
                        use.refusal = use.refusal or f"modified in place by {_target_name(user)}"


def parameter_at(gm: fx.GraphModule, target: str) -> nn.Parameter | None:
    """The Parameter a ``get_attr`` target names, or None if it names something else."""
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None


def _decide(plan: LayerPlan, settings: LayerSettings, refusal: str | None) -> None:
    """Give ``plan`` its ``settings`` and split, or the reason it stays dense."""
    plan.reason = refusal if refusal is not None else _refusal(plan, settings)
    if plan.reason is not None:
        return
    plan.settings = settings
    plan.num_codebooks, plan.codebook_dim = settings.split(math.prod(plan.rows_shape[1:]))
    dense, rpq = plan.bytes_before, plan.bytes_after
    if rpq >= dense:
        plan.reason = (f"would grow from {dense} to {rpq} bytes: {settings.num_codes} codewords per codebook "
                       f"cost more than {plan.rows_shape[0]} rows save")
        plan.settings = plan.num_codebooks = plan.codebook_dim = None


def _refusal(plan: LayerPlan, settings: LayerSettings) -> str | None:
    """Why ``settings`` cannot convert ``plan``'s weight at all, or None."""
    row_len = math.prod(plan.rows_shape[1:])
    if not plan.dtype.is_floating_point:
        return f"dtype {plan.dtype} is not floating point"
    split = settings.split(row_len)
    if isinstance(split, str):
        return split
    if settings.hot_rows and row_len % settings.hot_codebook_dim:
        return f"row length {row_len} is not divisible by hot_codebook_dim={settings.hot_codebook_dim}"
    return None


def plan_conversion(gm: fx.GraphModule | dict[str, fx.GraphModule], model: nn.Module, config: RPQConfig,
                    filter_fn: Callable[[nn.Module | nn.Parameter, str], bool] | None = None,
                    strict: bool = False) -> list[LayerPlan]:
    """A plan for every parameter read in ``gm`` (captured from ``model``) that is, or looks like, a weight.

    ``gm`` may also be several captured parts of ``model``, by their names in it: a parameter read
    in several parts (a tied weight) gets one plan. Parameters read by a linear / conv / embedding
    op get a split or a reason to stay dense; other parameters of two or more dims are listed dense
    with what reads them. ``strict`` turns any reason other than a deliberate exclusion into an
    :class:`RPQConversionError`.
    """
    parts = {"": gm} if isinstance(gm, fx.GraphModule) else {f"{name}.": part for name, part in gm.items()}
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    uses: dict[int, _Uses] = {}
    for prefix, part in parts.items():
        _collect_uses(part, prefix, uses)
    plans = []
    for key, use in uses.items():
        param, aliases = params[key], tuple(names[key])
        if not use.ops and param.dim() < 2:
            continue
        plan = LayerPlan(aliases[0], aliases, tuple(dict.fromkeys(use.ops)), tuple(param.shape), param.dtype,
                         param=param)
        plans.append(plan)
        if not use.ops:
            plan.reason = f"not the weight of a linear, conv or embedding ({'; '.join(dict.fromkeys(use.others))})"
            continue
        if param.dim() < 2:
            plan.reason = f"a {param.dim()}-D weight has no rows to quantize"
            continue
        asked = [*use.layers.items(), *([(plan.name, param)] if use.functional else [])]
        if filter_fn is not None and not all(_accepts(filter_fn, layer, name) for name, layer in asked):
            plan.reason, plan.excluded = "excluded by filter_fn", True
            continue
        settings = config.settings_for(*_config_names(plan))
        if settings is None:
            plan.reason, plan.excluded = "skipped by a config override", True
            continue
        if len(use.transposed) > 1:
            use.refusal = use.refusal or "read both as a weight and as its transpose"
        plan.transposed = use.transposed == {True}
        plan.padding_rows = tuple(sorted(use.padding_rows))
        _decide(plan, settings, use.refusal)
    _check_overrides(config, plans, model, strict)
    if strict:
        check_strict(plans)
    return plans


def _config_names(plan: LayerPlan) -> tuple[str, ...]:
    """The names ``RPQConfig.overrides`` patterns are tried against: the weight's, its layer's, its aliases."""
    return plan.name, plan.name.rpartition(".")[0], *plan.aliases


def _accepts(filter_fn: Callable, layer: nn.Module | nn.Parameter, name: str) -> bool:
    answer = filter_fn(layer, name)
    if not isinstance(answer, bool):
        raise TypeError(f"convert: filter_fn must return True or False, got {answer!r} ({type(answer).__name__}) "
                        f"for '{name}'")
    return answer


def _check_overrides(config: RPQConfig, plans: list[LayerPlan], model: nn.Module, strict: bool) -> None:
    """Warn (raise under ``strict``) about override patterns that match no weight: a typo is not silently ignored."""
    unmatched = config.unmatched({name for plan in plans for name in _config_names(plan)})
    if not unmatched:
        return
    message = (f"convert: RPQConfig.overrides patterns {unmatched} match no weight or layer of "
               f"{type(model).__name__} (weights are named like '{plans[0].name if plans else 'layer.weight'}', "
               "layers like the weight's name without '.weight'); check them for typos")
    if strict:
        raise RPQConversionError(message)
    warnings.warn(message, UserWarning, stacklevel=5)  # the caller of convert


def check_strict(plans: list[LayerPlan]) -> None:
    """Raise if a layer stays dense for want of support (not by a deliberate exclusion)."""
    failed = [p for p in plans if not p.converted and not p.excluded and p.ops]
    if failed:
        raise RPQConversionError("strict=True, but these layers cannot be converted:\n" + "\n".join(
            f"  {p.name} {list(p.shape)}: {p.reason}" for p in failed))
