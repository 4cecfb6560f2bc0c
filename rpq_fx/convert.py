"""The public entry points: ``convert(model, ...)``, the one-liner ``RPQ(model)`` and the class decorator ``rpq``."""

import copy
import dataclasses
import functools
import inspect
import sys
import warnings
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ._model import converted as converted_hooks
from .config import RPQ_MAX_CODEBOOK_DIM, RPQConfig
from .errors import RPQConversionError
from .fit import fit_weights
from .graph_module import RPQGraphModule, graphs_of
from .nn.layers import RPQ_LAYERS, from_dense
from .nn.weight import RPQWeight
from .passes import (LayerPlan, capture_call, capture_export, capture_layer, check_strict, cleanup, fuse,
                     inplace_adds, insert_checkpoints, new_weights, plan_conversion, rewrite)
from .passes import capture as capture_fx
from .passes.plan import parameter_at
from .passes.weight_ops import LAYERS
from .record import ConversionRecord, FitOutcome, attach_record

__all__ = ["convert", "RPQ", "rpq", "CAPTURES"]

FilterFn = Callable[[nn.Module | nn.Parameter, str], bool]


def _config(config: RPQConfig | None, **settings) -> RPQConfig:
    if config is None:
        return RPQConfig(**settings)
    if not isinstance(config, RPQConfig):
        raise TypeError(f"convert: config must be an RPQConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(RPQConfig) if f.name in settings}
    clashes = {name: value for name, value in settings.items() if value != defaults[name]}
    if clashes:
        raise ValueError(f"convert: pass settings either in config or as arguments, not both (got config and "
                         f"{', '.join(f'{k}={v!r}' for k, v in clashes.items())})")
    return config


def _fits(config: RPQConfig) -> bool:
    """Whether any layer is fitted with k-means (the default or an override says so)."""
    return config.init == "kmeans" or any(o.get("init") == "kmeans" for o in config.overrides.values())


def _placeholders(plans: list[LayerPlan]) -> dict[int, nn.Parameter]:
    """A ``deepcopy`` memo that copies each weight about to be converted as a free meta placeholder."""
    return {id(plan.param): nn.Parameter(torch.empty(plan.shape, dtype=plan.dtype, device="meta"))
            for plan in plans if plan.converted}


def _copy(gm: RPQGraphModule, memo: dict) -> RPQGraphModule:
    result = copy.deepcopy(gm, memo)
    type(result).__name__ = type(gm).__name__  # reason: GraphModule.__deepcopy__ forgets the class name
    return result


def _free_converted(model: nn.Module, plans: list[LayerPlan]) -> None:
    """Delete the converted dense weights from ``model`` itself (``inplace=True``)."""
    for plan in plans:
        for alias in plan.aliases if plan.converted else ():
            owner_path, _, name = alias.rpartition(".")
            owner = model.get_submodule(owner_path)
            if name in owner._parameters:
                delattr(owner, name)


def _weights(model: nn.Module, plans: list[LayerPlan], config: RPQConfig, calibration,
             progress: bool) -> tuple[dict[str, RPQWeight], dict[str, FitOutcome]]:
    """The RPQ weights of ``plans`` and how each was filled: drawn at random, then fitted where a
    plan's init is ``"kmeans"``, to the statistics of ``model`` (still dense) on the calibration
    inputs, if given."""
    weights = new_weights(plans, config.seed)
    fits = fit_weights(model, plans, weights, calibration, seed=config.seed, progress=progress)
    return weights, {plan.name: fits.get(plan.name, FitOutcome("random")) for plan in plans if plan.converted}


def _finish(gm: RPQGraphModule, plans: list[LayerPlan], weights: dict, config: RPQConfig, prefix: str = "") -> None:
    """Rewrite, checkpoint and clean up one captured graph module."""
    rewrite(gm, plans, weights, prefix)
    fuse(gm)
    inplace_adds(gm)
    if config.checkpoint:
        insert_checkpoints(gm)
    cleanup(gm)


def _record(target: nn.Module, plans: list[LayerPlan], fits: dict[str, FitOutcome], config: RPQConfig,
            path: str) -> None:
    layers = tuple(dataclasses.replace(plan, param=None) for plan in plans)
    attach_record(target, ConversionRecord(config, layers, path, fits))


def _convert_graph(model: nn.Module, gm: RPQGraphModule, path: str, config: RPQConfig, filter_fn, strict: bool,
                   inplace: bool, calibration, progress: bool) -> RPQGraphModule:
    """The whole model as one graph (fx or torch.export)."""
    plans = plan_conversion(gm, model, config, filter_fn, strict)
    weights, fits = _weights(model, plans, config, calibration, progress)
    if not inplace:
        gm = _copy(gm, _placeholders(plans))
    _finish(gm, plans, weights, config)
    if inplace:
        _free_converted(model, plans)
    _record(gm, plans, fits, config, path)
    gm.training = model.training
    return gm


def _capture_part(module: nn.Module) -> RPQGraphModule:
    """One weight-owning module of a model rewritten in place: a known layer as its functional op; a
    module whose forward traces with no argument fixed by tracing (no ``None`` default a branch could
    test) as its traced graph, so its ops are seen (GPT-2's ``Conv1D`` reads its weight transposed);
    any other module run untraced through ``functional_call``."""
    if type(module) in LAYERS:
        return capture_layer(module)
    if all(p.default is not None for p in inspect.signature(module.forward).parameters.values()):
        try:
            return capture_fx(module)
        except RPQConversionError:
            pass
    return capture_call(module)


def _layer(original: nn.Module, name: str, part: RPQGraphModule, plans: list[LayerPlan],
           weights: dict[str, RPQWeight]) -> nn.Module:
    """What replaces the weight-owning module ``original`` at ``name``: a built-in linear, embedding or
    conv as its RPQ layer (``RPQLinear`` ...: a real layer, its attributes kept); any other module
    (or one whose expansion is checkpointed) as its rewritten graph ``part``, given the original's
    public attributes (``stride``, ``padding_idx``, ... for code that reads them)."""
    checkpointed = any(node.target is torch.utils.checkpoint.checkpoint for node in part.graph.nodes)
    plan = next((p for p in plans if p.converted and f"{name}.weight" in p.aliases), None)
    if type(original) in RPQ_LAYERS and plan is not None and not checkpointed:
        return from_dense(original, weights[plan.name])
    part.train(original.training)
    for attribute, value in vars(original).items():
        if not attribute.startswith("_") and not hasattr(part, attribute):
            setattr(part, attribute, value)
    return part


def _outside_reads(whole: RPQGraphModule) -> dict[str, str]:
    """``{parameter name: the ops reading it}`` for every parameter the traced whole model reads as a
    tensor in another module's forward than its owner's (timm's EVA: ``F.linear(x, self.qkv.weight, b)``
    in its attention block)."""
    reads = {}
    for node in (n for graph in graphs_of(whole) for n in graph.nodes):
        if node.op != "get_attr" or not isinstance(parameter_at(whole, node.target), nn.Parameter):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        reader = next(reversed(stack.values()))[0] if stack else ""
        if reader != node.target.rpartition(".")[0]:
            reads[node.target] = ", ".join(sorted({getattr(u.target, "__name__", str(u.target)) for u in node.users}))
    return reads


def _agree_with_whole(plans: list[LayerPlan], whole: RPQGraphModule, model: nn.Module, config: RPQConfig,
                      filter_fn) -> None:
    """Leave dense each weight that the whole-model trace ``whole`` shows is no layer weight (fx's
    plan says why: a positional table read by indexing), or that code outside its layer reads as a
    tensor (it would meet an RPQ weight, which module capture cannot rewrite there)."""
    with warnings.catch_warnings():  # reason: the same override patterns were checked, and warned about, once
        warnings.simplefilter("ignore")
        verdicts = {plan.name: plan for plan in plan_conversion(whole, model, config, filter_fn)}
    reads = _outside_reads(whole)
    for plan in plans:
        reader = next((reads[alias] for alias in plan.aliases if alias in reads), None)
        verdict = verdicts.get(plan.name)
        if not plan.converted:
            continue
        if reader is not None:
            plan.reason = (f"read as a tensor outside its layer's forward (by {reader}), which module capture "
                           "cannot rewrite; capture='fx' converts it")
        elif verdict is not None and not verdict.ops:
            plan.reason = verdict.reason
        else:
            continue
        plan.settings = plan.num_codebooks = plan.codebook_dim = None


def _convert_module(model: nn.Module, path: str, config: RPQConfig, filter_fn, strict: bool, inplace: bool,
                    calibration, progress: bool, whole: RPQGraphModule | None = None) -> nn.Module:
    """The model object kept (``inplace``) or copied, each module that owns a weight swapped for its
    converted form (:func:`_layer`). Weights are planned over all of them at once, so a weight tied
    across layers stays one RPQ weight. ``whole``, the model traced whole where fx can, shows the
    weights read outside their layer's forward, which stay dense."""
    parts = {name: _capture_part(module) for name, module in model.named_modules()
             if name and any(p.dim() >= 2 for p in module.parameters(recurse=False))}
    plans = plan_conversion(parts, model, config, filter_fn, strict)
    if whole is not None:
        _agree_with_whole(plans, whole, model, config, filter_fn)
        if strict:
            check_strict(plans)
    converted = {id(plan.param) for plan in plans if plan.converted}
    # with the whole trace, a module is rewritten only for weights of its own: its children are layers of their own
    needed = {name for name in parts if whole is None or any(
        id(p) in converted for p in model.get_submodule(name).parameters(recurse=False))}
    weights, fits = _weights(model, plans, config, calibration, progress)
    memo = {} if inplace else _placeholders(plans)
    work = model if inplace else copy.deepcopy(model, memo)
    for name, part in parts.items():
        part = part if inplace else _copy(part, memo)
        _finish(part, plans, weights, config, prefix=f"{name}.")
        if name in needed and any(isinstance(m, RPQWeight) for m in part.modules()):
            work.set_submodule(name, _layer(work.get_submodule(name), name, part, plans, weights))
    if inplace:
        _free_converted(model, plans)
    _record(work, plans, fits, config, path)
    return work
CAPTURES = ("auto", "fx", "export", "module")


def _check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model already wrapped for parallel training: its weights are another wrapper's to
    shard or replicate, so the RPQ weights must be in place before it wraps them."""
    wrappers = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    if "torch.distributed.fsdp" in sys.modules:  # reason: no module can be an FSDP one unless FSDP was imported
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        wrappers += [FSDPModule, FullyShardedDataParallel]
    name, wrapped = next(((n, m) for n, m in model.named_modules() if isinstance(m, tuple(wrappers))), (None, None))
    if wrapped is not None:
        where = f"'{name}' is" if name else f"the model is"
        raise RPQConversionError(
            f"convert: {where} wrapped for parallel training ({type(wrapped).__name__}); convert the plain model first, "
            "then wrap the converted one (DistributedDataParallel(convert(model)), or fully_shard its blocks)")


def _consumed(name: str, module: nn.Module, args) -> None:
    raise RPQConversionError(f"{name} was consumed by rpq_fx.convert(..., inplace=True): its layers and tensors moved "
                             "into the model convert returned; call that one instead (capture='module' converts a "
                             "model in place and returns the same object)")


def _mark_consumed(model: nn.Module, result: nn.Module) -> None:
    """Make every module of ``model`` that is not part of ``result`` raise a clear error when called."""
    kept = {id(m) for m in result.modules()}
    for name, module in model.named_modules():
        if id(module) not in kept:
            label = f"'{name}' of {type(model).__name__}" if name else type(model).__name__
            module.register_forward_pre_hook(functools.partial(_consumed, label))


def _capture_choice(capture: str, example_inputs) -> str:
    if capture not in CAPTURES:
        raise ValueError(f"convert: capture must be one of {list(CAPTURES)}, got {capture!r}")
    if capture == "export" and example_inputs is None:
        raise ValueError("convert: capture='export' needs example_inputs (inputs torch.export runs the model on)")
    if capture in ("fx", "module") and example_inputs is not None:
        raise ValueError(f"convert: example_inputs are for capture='export'; capture={capture!r} takes none")
    return "export" if capture == "auto" and example_inputs is not None else capture


def convert(model: nn.Module, num_codebooks: int | None = None, *, codebook_dim: int | None = None,
            max_codebook_dim: int | None = None, num_codes: int = 256, shared_codebooks: bool = False,
            init: str = "random", codebook_dtype: str | torch.dtype | None = None, additive_codebooks: int = 1,
            checkpoint: bool = False, filter_fn: FilterFn | None = None, config: RPQConfig | None = None,
            seed: int = 0, inplace: bool = False, strict: bool = False, capture: str = "auto", example_inputs=None,
            calibration=None, progress: bool = True) -> nn.Module:
    """Rewrite every linear / conv / embedding weight of ``model`` as an RPQ weight.

    Exactly one of ``num_codebooks``, ``codebook_dim`` or ``max_codebook_dim`` sets how each weight
    row is split (or ``config`` does, with per-layer overrides). ``filter_fn(layer_or_weight, name)``
    picks layers: it is asked about every layer that reads a weight (each, for a tied weight) and
    must answer True or False; the weight is converted only if it accepts them all. Layers that
    cannot be converted stay dense and are listed by :func:`report`; ``strict=True`` raises instead.
    ``checkpoint=True`` recomputes each expanded weight in backward.

    ``init="random"`` (the RPQ default) draws codes and codebooks for training from scratch;
    ``init="kmeans"`` fits them to the model's trained weights (product quantization, k-means per
    codebook). ``calibration``, an iterable of example inputs (each a tensor, a tuple of positional
    inputs or a dict of keyword inputs), makes that fit data-aware: the dense model is run on them
    (in eval mode, without grad) and each linear / conv layer is fitted to minimise its output
    error on those inputs, each embedding weighted by how often its rows were looked up.
    ``codebook_dtype="float16"`` / ``"bfloat16"`` stores the codebooks in half precision.
    ``additive_codebooks=M`` sums M codes per slice (additive quantization; see :class:`RPQConfig`).
    ``progress`` shows a bar for calibration and fitting when they take more than two seconds.

    ``capture`` says how the model is captured (``report`` says which was used):

    - ``"fx"``: ``torch.fx`` symbolic tracing of the whole model, an :class:`RPQGraphModule`;
    - ``"export"``: ``torch.export`` on ``example_inputs`` (a tensor, a tuple of positional inputs or
      a dict of keyword inputs), an aten-level :class:`RPQGraphModule` fixed to the current
      train/eval mode (a Hugging Face model's to ``use_cache=False`` unless the inputs set it);
    - ``"module"``: the model object kept, of its own class with every method and attribute, each
      built-in linear / embedding / conv swapped for its :mod:`rpq_fx.nn` layer (``RPQLinear``, ...,
      keeping ``in_features``, ``stride`` and the like) and any other layer that owns a weight for
      its own rewritten graph;
    - ``"auto"`` (default): ``"export"`` when ``example_inputs`` are given, else ``"fx"``, and
      ``"module"`` where fx cannot trace the whole (every Hugging Face model, for one).

    The input model is left untouched unless ``inplace=True``. With module capture, ``inplace=True``
    converts the model itself and returns it; with fx or export it moves the model's modules and
    tensors into the returned graph module and consumes the model (calling it then raises an error
    that says so). Converting a model that already holds RPQ weights, or one wrapped for parallel
    training (``DistributedDataParallel``, FSDP: convert first, then wrap), is an error. Random
    draws come from generators seeded by ``seed``, never from torch's global generator; a weight
    with ``requires_grad=False`` gets frozen codebooks. Layer types of your own: :func:`register_layer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_not_wrapped(model)
    config = _config(config, num_codebooks=num_codebooks, codebook_dim=codebook_dim,
                     max_codebook_dim=max_codebook_dim, num_codes=num_codes, shared_codebooks=shared_codebooks,
                     init=init, codebook_dtype=codebook_dtype, additive_codebooks=additive_codebooks,
                     checkpoint=checkpoint, seed=seed)
    capture = _capture_choice(capture, example_inputs)
    if calibration is not None and not _fits(config):
        raise ValueError("convert: calibration= makes the k-means fit data-aware; pass init='kmeans' with it")
    converted = next((name for name, m in model.named_modules() if isinstance(m, RPQWeight)), None)
    if converted is not None:
        raise RPQConversionError(f"convert: {type(model).__name__} already holds an RPQ weight at '{converted}'; "
                                 "convert the original dense model instead")
    options = dict(config=config, filter_fn=filter_fn, strict=strict, inplace=inplace, calibration=calibration,
                   progress=progress)
    if capture == "module" and type(model) in LAYERS:
        raise RPQConversionError(f"convert: capture='module' converts the layers inside a model, and this model is a "
                                 f"bare {type(model).__name__}; use capture='fx' for it, or convert a model holding it")
    result = _capture_and_convert(model, capture, example_inputs, options)
    converted_hooks(result)
    return result


def _capture_and_convert(model: nn.Module, capture: str, example_inputs, options: dict) -> nn.Module:
    """``model`` captured as ``capture`` says (``"auto"`` resolved to fx or, where fx fails, module) and converted."""
    if capture == "module":
        try:
            whole = capture_fx(model)
        except RPQConversionError:
            whole = None
        return _convert_module(model, "module", **options, whole=whole)
    if capture == "export":
        result = _convert_graph(model, capture_export(model, example_inputs), "torch.export", **options)
    else:
        try:
            gm = capture_fx(model)
        except RPQConversionError as untraceable:
            if capture == "fx":
                raise
            why = untraceable.__cause__.__class__.__name__
            return _convert_module(model, f"in place ({why} when tracing the whole model)", **options)
        result = _convert_graph(model, gm, "torch.fx", **options)
    if options["inplace"]:
        _mark_consumed(model, result)
    return result


def RPQ(model: nn.Module | type[nn.Module], **kwargs) -> nn.Module | type[nn.Module]:
    """``net = RPQ(net)``: :func:`convert` with RPQ defaults (codewords of at most
    ``RPQ_MAX_CODEBOOK_DIM`` = 64 values). Given a model class instead, the class whose instances
    convert so at the end of ``__init__`` (:func:`rpq`)."""
    if not {"num_codebooks", "codebook_dim", "max_codebook_dim", "config"} & kwargs.keys():
        kwargs["max_codebook_dim"] = RPQ_MAX_CODEBOOK_DIM
    if isinstance(model, type):
        return rpq(**kwargs)(model)
    return convert(model, **kwargs)


def rpq(module_class: type[nn.Module] | None = None, /, **settings):
    """Class decorator: ``@rpq_fx.rpq(num_codebooks=8)`` on an ``nn.Module`` class makes every
    instance convert itself at the end of its ``__init__`` (``convert(self, capture="module",
    inplace=True, **settings)``), so it keeps its class, methods and attributes. A subclass's
    instances convert at the end of the subclass's ``__init__``. Bare ``@rpq_fx.rpq`` uses
    :func:`RPQ`'s defaults."""
    if module_class is not None:
        return RPQ(module_class, **settings)
    forbidden = {"inplace", "capture", "example_inputs"} & settings.keys()
    if forbidden:
        raise TypeError(f"rpq: {sorted(forbidden)} are fixed by the decorator (capture='module', inplace=True)")
    inspect.signature(convert).bind(None, **settings)  # an unknown setting fails here, not in every __init__
    _config(settings.get("config"), **{k: v for k, v in settings.items() if k in _CONFIG_FIELDS})

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"rpq: decorates a torch.nn.Module subclass, got {cls!r}")
        cls.__init__ = _converting_init(cls.__init__, settings)
        parent_hook = cls.__dict__.get("__init_subclass__")

        def __init_subclass__(subclass, **kwargs):
            if parent_hook is not None:
                parent_hook.__func__(subclass, **kwargs)
            else:
                super(cls, subclass).__init_subclass__(**kwargs)
            if "__init__" in subclass.__dict__:
                subclass.__init__ = _converting_init(subclass.__init__, settings)

        cls.__init_subclass__ = classmethod(__init_subclass__)
        return cls

    return decorate


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RPQConfig)}
_DEPTH = "_rpq_init_depth"


def _converting_init(init, settings: dict):
    """``init``, then :func:`convert` of the instance in place once the outermost ``__init__`` returns."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        depth = vars(self).get(_DEPTH, 0)
        vars(self)[_DEPTH] = depth + 1  # reason: in __dict__ directly; nn.Module's __setattr__ needs __init__ run
        try:
            init(self, *args, **kwargs)
        finally:
            vars(self)[_DEPTH] = depth
        if depth == 0:
            del vars(self)[_DEPTH]
            convert(self, capture="module", inplace=True, **settings)

    return __init__
