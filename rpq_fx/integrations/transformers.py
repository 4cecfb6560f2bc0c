"""Hugging Face transformers: the ``"rpq"`` quantization method, registered through transformers' own
``register_quantization_config`` / ``register_quantizer`` (as AQLM and VPTQ are built in).

- ``model.save_pretrained(folder)`` of a converted model writes its codebooks and uint8 codes as
  safetensors (sharded as transformers shards) and ``quantization_config`` in ``config.json``:
  ``quant_method: "rpq"``, the ``RPQConfig`` and the conversion record (one entry per weight).
- ``AutoModel*.from_pretrained(folder)`` rebuilds the RPQ layers on the meta device by converting the
  empty model with the saved config, checks that this gives the saved per-layer decisions and that
  the checkpoint holds exactly the rebuilt model's tensors, then lets transformers load them.
- ``from_pretrained(dense_folder, quantization_config=RPQHfConfig(...))`` converts a dense checkpoint
  once its weights are loaded (random or k-means init; a calibrated fit goes through ``convert``).

Loading puts the model on one device (``device_map`` None, ``"cpu"``, ``"cuda:0"``, ...) in the saved
dtype; other choices are refused before anything is read.
"""

import copy
import sys
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._model import on_converted
from ..config import RPQConfig, dtype_name, without_new_defaults
from ..convert import convert
from ..errors import RPQConversionError
from ..io import (SAFETENSORS_DTYPES, RPQCheckpointError, check_layer_record, comparable_record, filled_as_saved,
                  layer_from_record, layer_record, saved_exclusions, unfitted)
from ..nn.weight import RPQWeight, check_index
from ..record import ConversionRecord, attach_record, conversion_record

__all__ = ["RPQHfConfig", "RPQHfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "rpq"
FORMAT_VERSION = 1
_WHERE = "config.json's quantization_config"
_SPREAD = ("auto", "balanced", "balanced_low_0", "sequential")


@register_quantization_config(QUANT_METHOD)
class RPQHfConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an RPQ model: an :class:`~rpq_fx.RPQConfig` (given, as a dict,
    or as its settings: ``RPQHfConfig(codebook_dim=16, init="kmeans")``) and, for a converted model,
    ``layers``: its conversion record, one format-2 entry per weight (what ``rpq_fx.save`` writes).

    Pass one to ``from_pretrained(dense_folder, quantization_config=...)`` to convert at load time;
    ``save_pretrained`` of a converted model writes one with ``layers`` into ``config.json``. A config
    read from a file is checked as a checkpoint is: a wrong value raises a ValueError naming it.
    """

    def __init__(self, rpq_config: RPQConfig | Mapping | None = None, *, layers: list | None = None,
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **settings):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"RPQHfConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"{_WHERE}: format_version {format_version!r} is not one this rpq_fx reads "
                             f"({FORMAT_VERSION}); upgrade rpq_fx")
        if rpq_config is not None and settings:
            raise ValueError(f"RPQHfConfig: pass rpq_config or settings, not both (got {sorted(settings)})")
        if isinstance(rpq_config, Mapping):
            try:
                rpq_config = RPQConfig.from_dict(dict(rpq_config))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{_WHERE}: rpq_config: {error}") from None
        elif rpq_config is None:
            rpq_config = RPQConfig(**settings)
        elif not isinstance(rpq_config, RPQConfig):
            raise TypeError(f"RPQHfConfig: rpq_config must be an RPQConfig or a dict, got {type(rpq_config).__name__}")
        if layers is not None:
            if not isinstance(layers, list):
                raise ValueError(f"{_WHERE}: layers must be a list of layer records, got {type(layers).__name__}")
            for i, record in enumerate(layers):
                try:
                    check_layer_record(_WHERE, i, record)
                except RPQCheckpointError as error:
                    raise ValueError(str(error)) from None
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.rpq_config = rpq_config
        self.layers = copy.deepcopy(layers)

    @classmethod
    def from_record(cls, record: ConversionRecord) -> "RPQHfConfig":
        """The config of a converted model: its ``RPQConfig`` and one entry per weight."""
        return cls(record.config, layers=[layer_record(layer, record.fits.get(layer.name)) for layer in record.layers])

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "rpq_config": without_new_defaults(self.rpq_config.to_dict()), "layers": copy.deepcopy(self.layers)}


def _pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    # reason: registering must stay cheap (import rpq_fx does it); no model can be a PreTrainedModel before
    # transformers.modeling_utils is imported, so this one is not imported until then
    utils = sys.modules.get("transformers.modeling_utils")
    return utils is not None and isinstance(model, utils.PreTrainedModel)


def _devices(device_map) -> set[str]:
    if isinstance(device_map, Mapping):
        return {str(torch.device(d) if isinstance(d, int) else d) for d in device_map.values()}
    return {str(torch.device(device_map) if isinstance(device_map, int) else device_map)}


def _check_device_map(device_map) -> None:
    """One device, or none (transformers' default): RPQ weights are not split over devices or offloaded."""
    if device_map is None:
        return
    if isinstance(device_map, str) and device_map in _SPREAD:
        raise ValueError(f"rpq: device_map={device_map!r} is not supported: an RPQ model loads on one device; "
                         "pass device_map=None, 'cpu' or 'cuda:0' (or a dict mapping '' to one device)")
    devices = _devices(device_map)
    if len(devices) > 1 or devices & {"disk", "meta"}:
        raise ValueError(f"rpq: device_map spreads the model over {sorted(devices)}: an RPQ model loads on one device "
                         "and is not offloaded; pass device_map=None, 'cpu' or 'cuda:0'")


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``state_dict`` holds, by name (a tied tensor under each of its names)."""
    return dict(model.state_dict(keep_vars=True))


def _check_files(model: nn.Module, files: list[str] | None) -> set[str]:
    """The checkpoint holds exactly the rebuilt model's tensors, under the names ``save_pretrained`` gives
    them (the model's own, through its checkpoint-format renamings; a tied tensor under at least one name),
    with their shapes, and the RPQ tensors in their dtypes: a file that does not fit is refused before it
    loads. Returns the model's names of tensors the file holds under another name (a tied weight's others)."""
    if not files:
        raise ValueError("rpq: from_pretrained found no checkpoint files to load the RPQ weights from")
    stored: dict[str, tuple[list[int], str]] = {}
    where: dict[str, str] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise ValueError(f"rpq: {file} is not a safetensors file; RPQ models are saved and loaded as safetensors")
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                stored[key], where[key] = (piece.get_shape(), piece.get_dtype()), file
    from transformers.core_model_loading import revert_weight_conversion  # loaded by from_pretrained already

    own = _tensors(model)
    views = {name: tensor.detach() for name, tensor in own.items()}  # one object per name, to follow each
    by_view = {id(view): name for name, view in views.items()}
    # reason: save_pretrained writes some models' tensors under their checkpoint-format names (ViT's
    # encoder.layer.0.attention.attention.query for layers.0.attention.q_proj); its own inverse says which
    names = {key: by_view.get(id(view)) for key, view in revert_weight_conversion(model, dict(views)).items()}
    rpq = {id(t): f"{name}.{n}" for name, w in model.named_modules() if isinstance(w, RPQWeight)
           for n, t in (*w.named_parameters(recurse=False), *w.named_buffers(recurse=False))}
    renamed = {id(own[name]) for name in names.values() if name is not None}
    if set(rpq) - renamed:
        raise ValueError(f"rpq: {type(model).__name__}'s checkpoint format merges or splits "
                         f"'{rpq[next(iter(set(rpq) - renamed))]}'; RPQ tensors cannot be converted that way")
    groups: dict[int, list[str]] = {}
    for key, name in names.items():
        if name is not None:
            groups.setdefault(id(own[name]), []).append(key)
    missing = [keys[0] for keys in groups.values() if not any(k in stored for k in keys)]
    unexpected = sorted(set(stored) - set(names))
    if missing or unexpected:
        raise ValueError(f"rpq: the checkpoint does not hold this RPQ model's tensors: missing {missing[:4] or 'none'}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4] or 'none'}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    for key, (shape, dtype) in stored.items():
        if names[key] is None:
            continue
        tensor = own[names[key]]
        if list(tensor.shape) != shape:
            raise ValueError(f"rpq: '{key}' is {shape} in the checkpoint, {list(tensor.shape)} in the rebuilt model")
        if id(tensor) in rpq and SAFETENSORS_DTYPES.get(dtype) != tensor.dtype:
            raise ValueError(f"rpq: '{key}' is {dtype} in the checkpoint, {dtype_name(tensor.dtype)} in the rebuilt "
                             "model")
    bounds = {id(w._buffers[n]): bound for _, w in model.named_modules() if isinstance(w, RPQWeight)
              for n, bound in w.index_bounds().items()}
    for key in sorted(stored):
        tensor = own[names[key]] if names[key] is not None else None
        if tensor is not None and id(tensor) in bounds:  # codes and hot-row indices index memory: read and check them
            with safe_open(where[key], framework="pt") as f:
                value = f.get_tensor(key)
            try:
                check_index(value, tensor.dtype, bounds[id(tensor)], key)
            except (IndexError, TypeError) as error:
                raise ValueError(f"rpq: damaged or crafted checkpoint: {error}") from None
    return {name for key, name in names.items() if name is not None and key not in stored}


def _tie(model: nn.Module) -> None:
    """Tie ``model``'s weights as its config says (``tie_word_embeddings``), as ``tie_weights`` would:
    the saved model was converted with them tied, and a tied weight converts to one RPQ weight."""
    # reason: from_pretrained builds the model with tie_weights disabled and ties after loading the weights;
    # the conversion must see them tied now
    for target, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        parent, _, name = target.rpartition(".")
        setattr(model.get_submodule(parent), name, model.get_parameter(source))


def _retie_converted(model: nn.Module) -> None:
    """Point transformers' tied-weight maps at the RPQ tensors: a tied weight converts to one RPQ weight,
    one module under each tied name, so the names the maps hold are no longer parameters. ``tie_weights()``
    and ``save_pretrained`` (which saves one name of each tied tensor) read ``_tied_weights_keys``;
    ``from_pretrained`` reads ``all_tied_weights_keys`` (parameters only), where a converted tie needs nothing."""
    record = conversion_record(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    parts = {alias: [n for n, _ in (*modules[alias].named_parameters(), *modules[alias].named_buffers())]
             for layer in record.layers if layer.converted for alias in layer.aliases
             if isinstance(modules.get(alias), RPQWeight)}
    for prefix, module in model.named_modules():
        if not _pretrained(module):
            continue
        dotted = f"{prefix}." if prefix else ""
        tied = getattr(module, "_tied_weights_keys", None)
        if isinstance(tied, Mapping) and any(dotted + target in parts for target in tied):
            module._tied_weights_keys = {
                **{t: s for t, s in tied.items() if dotted + t not in parts},
                **{f"{t}.{n}": f"{s}.{n}" for t, s in tied.items() if dotted + t in parts for n in parts[dotted + t]}}
        if getattr(module, "all_tied_weights_keys", None):
            module.all_tied_weights_keys = {t: s for t, s in module.all_tied_weights_keys.items()
                                            if dotted + t not in parts}


def _rebuild(model: nn.Module, config: RPQHfConfig) -> None:
    """Convert ``model`` (empty, on the meta device) as the saved one was, in place, and check that
    every weight's decision (converted how, or left dense why) is the saved one."""
    saved = config.layers
    _tie(model)
    try:
        result = convert(model, config=unfitted(config.rpq_config), filter_fn=saved_exclusions(saved), capture="module",
                         inplace=True, progress=False)
    except RPQConversionError as error:
        raise ValueError(f"rpq: this {type(model).__name__} cannot be converted with the saved config: "
                         f"{error}") from None
    if result is not model:
        raise RPQConversionError(f"rpq: converting {type(model).__name__} in place returned another object "
                                 f"({type(result).__name__}); transformers needs the model itself rewritten")
    record = conversion_record(model)
    here = {layer.name: comparable_record(layer_record(layer, None)) for layer in record.layers}
    there = {r["name"]: comparable_record(r) for r in saved}
    for name in sorted(here.keys() | there.keys()):
        a, b = there.get(name), here.get(name)
        if a != b:
            keys = sorted(k for k in a.keys() & b.keys() if a[k] != b[k]) if a and b else []
            detail = "; ".join(f"{k}: saved {a[k]!r}, here {b[k]!r}" for k in keys) or \
                ("not in the saved record" if a is None else "not in this model")
            raise ValueError(f"rpq: converting this {type(model).__name__} with the saved config gives another "
                             f"result for '{name}' ({detail}); was the checkpoint saved from this architecture?")
    fits = {plan.name: fit for plan, fit in (layer_from_record(_WHERE, i, r, 2) for i, r in enumerate(saved))
            if fit is not None}
    attach_record(model, ConversionRecord(config.rpq_config, tuple(filled_as_saved(layer, fits)
                                                                   for layer in record.layers), record.path, fits))
    _retie_converted(model)
    for module in model.modules():
        slots = [*module._parameters.values(), *module._buffers.values()]
        if slots and all(slot is None for slot in slots):
            # reason: a layer run through functional_call keeps an empty shell of the original module (its tensors
            # are the converted part's); transformers' initialize_weights would init its missing tensors
            module._is_hf_initialized = True


def _check_loaded(model: nn.Module) -> None:
    """Every tensor was loaded (none left on the meta device) and every code and hot-row index is in range:
    they index memory, and transformers copies them in without the RPQ weight's own checks."""
    for name, tensor in _tensors(model).items():
        if tensor.is_meta:
            raise ValueError(f"rpq: '{name}' was not loaded from the checkpoint")
    for name, weight in model.named_modules():
        if isinstance(weight, RPQWeight):
            for buffer, bound in weight.index_bounds().items():
                try:
                    check_index(weight._buffers[buffer], weight._buffers[buffer].dtype, bound, f"{name}.{buffer}")
                except (IndexError, TypeError) as error:
                    raise ValueError(f"rpq: damaged or crafted checkpoint: {error}") from None


def _own_aligned_memory(model: nn.Module) -> None:
    """Give every CPU tensor that transformers handed over at an unaligned address (straight from the
    checkpoint's memory, at the file's offsets) memory of its own, aligned as torch allocates it."""
    # reason: ATen's CPU bmm/GEMM rounds differently at different alignments (a codebook 4 floats off made
    # rpq_fx::linear differ by 1e-7), so a loaded model would not reproduce the saved one's outputs bit for bit
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for tensor in tensors.values():
                    if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                        tensor.data = tensor.data.clone()


def _check_intact(model: nn.Module, record: ConversionRecord) -> None:
    """Every weight the record says is converted is still an RPQ weight of ``model`` (not replaced since)."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for layer in record.layers:
        for alias in layer.aliases if layer.converted else ():
            if not isinstance(modules.get(alias), RPQWeight):
                raise ValueError(f"rpq: '{alias}' was converted but the model now holds "
                                 f"{type(modules.get(alias)).__name__ if alias in modules else 'a dense tensor'} there "
                                 "(a layer replaced after conversion, e.g. by resize_token_embeddings or "
                                 "set_input_embeddings); change layers before converting, then convert again")


@register_quantizer(QUANT_METHOD)
class RPQHfQuantizer(HfQuantizer):
    """transformers' side of an RPQ model: rebuilds a saved one before its weights load, converts a
    dense one after they load, and refreshes ``config.json``'s record when the model is saved."""

    requires_calibration = False  # a dense checkpoint converts at load time
    quantization_config: RPQHfConfig

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        _check_device_map(device_map)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """A saved RPQ model loads in the dtype it was saved in (its codebooks are that dtype's values)."""
        layers = self.quantization_config.layers if self.pre_quantized else None
        saved = {r["dtype"] for r in layers or () if r["reason"] is None}
        if saved and dtype_name(dtype) not in saved:
            raise ValueError(f"rpq: this RPQ model was saved in {', '.join(sorted(saved))}; load it with dtype='auto' "
                             f"or that dtype, not {dtype_name(dtype)} (convert the dense model in another dtype "
                             "instead)")
        return dtype

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs) -> None:
        if not self.pre_quantized:
            return
        if self.quantization_config.layers is None:
            raise ValueError(f"rpq: {_WHERE} has no per-layer record ('layers'); it was not written by save_pretrained "
                             "of an rpq_fx model")
        _rebuild(model, self.quantization_config)
        elsewhere = _check_files(model, checkpoint_files)

        # reason: a tied RPQ weight is one module under several names; transformers' loader takes every name
        # in state_dict as a key to load, and would fill the names the file does not hold (it holds one) with
        # empty tensors, over the loaded ones. They are left out of state_dict while the weights load.
        def drop(module, state_dict, prefix, local_metadata) -> None:
            for name in elsewhere:
                state_dict.pop(prefix + name, None)

        self._loading = model.register_state_dict_post_hook(drop)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        if self.pre_quantized:
            self._loading.remove()
            _check_loaded(model)
            _own_aligned_memory(model)
            return model
        result = convert(model, config=self.quantization_config.rpq_config, capture="module", inplace=True,
                         progress=False)
        if result is not model:
            raise RPQConversionError(f"rpq: converting {type(model).__name__} in place returned another object")
        self.quantization_config.layers = RPQHfConfig.from_record(conversion_record(model)).layers
        _retie_converted(model)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module):
        """At ``save_pretrained``, before ``config.json`` is written: the record it gets is the model's own,
        and a model whose converted layers were replaced since is refused."""
        record = conversion_record(model)
        if record is None:
            raise ValueError(f"rpq: {type(model).__name__} has no rpq_fx conversion record to save")
        _check_intact(model, record)
        self.quantization_config = RPQHfConfig.from_record(record)
        model.config.quantization_config = self.quantization_config
        return None, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # codebooks and dense leftovers train; codes stay fixed

    @property
    def is_qat_trainable(self) -> bool:
        """The model trains as it is (no adapters needed): ``Trainer`` accepts it."""
        return True


@on_converted
def _attach(model: nn.Module) -> None:
    """A Hugging Face model that ``convert`` or ``load`` returns is marked quantized with ``"rpq"``, as
    ``from_pretrained`` marks one, so ``save_pretrained`` writes what ``from_pretrained`` rebuilds."""
    record = conversion_record(model)
    # reason: a torch.export capture of a Hugging Face model can pass as one (isinstance) without being one
    if not _pretrained(model) or isinstance(model, torch.fx.GraphModule) or record is None:
        return
    config = RPQHfConfig.from_record(record)
    model.config.quantization_config = config
    model.hf_quantizer = RPQHfQuantizer(config, pre_quantized=True)
    model.is_quantized, model.quantization_method = True, QUANT_METHOD  # as from_pretrained's preprocess_model sets
    _retie_converted(model)

