"""``save`` / ``load`` / ``save_dense``: RPQ checkpoints as safetensors, with no pickle anywhere.

An RPQ checkpoint is one safetensors file:

- tensors: every parameter and buffer of the converted model, each stored once under its first
  name (codebooks in their dtype, codes as uint8 / int16, dense leftovers: biases, norms, layers
  left dense); the other names of a shared tensor (a tied weight) are listed as aliases;
- metadata: ``format = "rpq_fx"``, ``format_version``, and ``rpq_fx``: one JSON document with the
  ``RPQConfig``, the conversion record (one entry per weight: converted or why not), the
  architecture (every original tensor name, shape and dtype, and their fingerprint), the generated
  forward code, the aliases, a SHA-256 per tensor, the versions that wrote it and optionally the
  ``spec`` the model was built from; ``rpq_fx_sha256`` is the digest of that JSON.

``load(model, path)`` converts ``model`` (the original architecture, on the meta device if you
like) with the saved config, checks that the result has exactly the saved structure, reads and
verifies every tensor, and only then puts them in: any error leaves nothing half-loaded.
"""

import dataclasses
import hashlib
import json
import os
import re
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import RPQConfig
from .convert import convert
from .decompress import decompress
from .graph_module import RPQGraphModule
from .nn.weight import RPQWeight
from .passes import LayerPlan
from .report import Report, report

__all__ = ["save", "load", "save_dense", "checkpoint_info", "checkpoint_report", "RPQCheckpointError",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "rpq_fx"
DENSE_FORMAT = "rpq_fx.dense"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_FX_CONSTANT = re.compile(r"_tensor_constant\d+")  # tensors torch.fx adds for constants in forward


class RPQCheckpointError(ValueError):
    """A checkpoint that cannot be loaded: not an rpq_fx file, damaged, another version or architecture."""


# ---------------------------------------------------------------------------------------------------
# helpers shared by save and load


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RPQCheckpointError(f"unknown dtype {name!r} in checkpoint metadata")
    return dtype


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) under every name it has."""
    return dict(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))


def _rpq_paths(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, RPQWeight)}


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _layer_record(layer: LayerPlan) -> dict[str, Any]:
    record = {}
    for f in dataclasses.fields(layer):
        if f.name == "param":
            continue
        value = getattr(layer, f.name)
        if isinstance(value, torch.dtype):
            value = _dtype_name(value)
        elif isinstance(value, tuple):
            value = list(value)
        record[f.name] = value
    return record


def _layer_from_record(record: dict[str, Any]) -> LayerPlan:
    known = {f.name for f in dataclasses.fields(LayerPlan)} - {"param"}
    values = {k: v for k, v in record.items() if k in known}
    values["dtype"] = _parse_dtype(values["dtype"])
    if values.get("codebook_dtype") is not None:
        values["codebook_dtype"] = _parse_dtype(values["codebook_dtype"])
    for key in ("aliases", "ops", "shape"):
        values[key] = tuple(values[key])
    return LayerPlan(**values)


def _architecture(model: nn.Module) -> dict[str, Any]:
    """The original model's tensors as the converted one implies them: name, shape, dtype, kind."""
    rpq = _rpq_paths(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    entries: dict[str, list] = {}
    for name, tensor in _tensors(model).items():
        if name.rpartition(".")[0] not in rpq:
            entries[name] = [list(tensor.shape), _dtype_name(tensor.dtype), "param" if name in params else "buffer"]
    for layer in model.rpq_layers:
        if layer.converted:
            entries.update(dict.fromkeys(layer.aliases, [list(layer.shape), _dtype_name(layer.dtype), "param"]))
    tensors = [[name, *entries[name]] for name in sorted(entries)]
    fingerprint = hashlib.sha256(json.dumps(tensors, separators=(",", ":")).encode()).hexdigest()
    return {"class": type(model).__name__, "tensors": tensors, "fingerprint": fingerprint}


def _is_converted(model: Any) -> bool:
    return isinstance(model, nn.Module) and getattr(model, "rpq_config", None) is not None


def _graph_parts(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``[("", model)]`` for a converted GraphModule; else the outermost GraphModules inside it (a
    model converted in place)."""
    if isinstance(model, fx.GraphModule):
        return [("", model)]
    parts: list[tuple[str, fx.GraphModule]] = []
    for name, module in model.named_modules():
        if isinstance(module, fx.GraphModule) and not any(name.startswith(f"{p}.") for p, _ in parts):
            parts.append((name, module))
    return parts


def _mode_name(training: bool) -> str:
    return "train" if training else "eval"


def _codes(model: nn.Module) -> dict[str, str]:
    """The generated forward of each graph and each mode it has a graph for: ``{"train": code}``,
    ``{"train": ..., "eval": ...}``, or for a model converted in place ``{"<part>:train": ...}``."""
    codes = {}
    for name, gm in _graph_parts(model):
        graphs = gm.meta.get("rpq_mode_graphs") or {gm.training: gm.graph}
        for mode, graph in graphs.items():
            codes[f"{name}:{_mode_name(mode)}" if name else _mode_name(mode)] = graph.python_code("self").src
    return codes


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors, written to a temporary file first so that a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # reason: the file is written 0600; give it the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _unique(named: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``named`` with each tensor once (under its first name), and ``{other name: first name}``."""
    first: dict[int, str] = {}
    unique, aliases = {}, {}
    storages: set[tuple[int, int]] = set()
    for name, tensor in named.items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.device.index or 0)
        if tensor.numel() and key in storages:
            tensor = tensor.clone()  # reason: safetensors refuses two names on one storage (views of one tensor)
        storages.add(key)
        unique[name] = tensor.contiguous().cpu()
    return unique, aliases


# ---------------------------------------------------------------------------------------------------
# save


def save(model: nn.Module, path: str | os.PathLike, *, spec: str | None = None) -> Path:
    """Write the converted ``model`` to ``path`` as a safetensors RPQ checkpoint; returns the path.

    The file holds each parameter and buffer once (codebooks, uint8/int16 codes, dense leftovers),
    so it is ``model_size(model)`` MiB plus a few KiB of JSON metadata: the config, the conversion
    record, the architecture fingerprint, the generated code and a SHA-256 per tensor. ``spec``
    (e.g. ``"timm:resnet18"``) records how to build the original architecture again, for
    ``rpq-fx inspect``. Load it with :func:`load`.
    """
    if not _is_converted(model):
        raise TypeError(f"save: expected a model returned by rpq_fx.convert (it carries rpq_layers and "
                        f"rpq_config), got a {type(model).__name__} without them; for a dense model use "
                        "safetensors directly")
    named = _tensors(model)
    on_meta = [name for name, t in named.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"save: {len(on_meta)} tensors are on the meta device and hold no values "
                         f"(first: '{on_meta[0]}'); load or initialise the weights before saving")
    tensors, aliases = _unique(named)
    info = {
        "rpq_fx_version": _version(),
        "torch_version": torch.__version__,
        "config": model.rpq_config.to_dict(),
        "layers": [_layer_record(layer) for layer in model.rpq_layers],
        "architecture": _architecture(model),
        "code": _codes(model),
        "aliases": aliases,
        "sha256": {name: _digest(t) for name, t in tensors.items()},
        "spec": spec,
        "path": getattr(model, "rpq_path", None),
    }
    text = json.dumps(info, sort_keys=True, separators=(",", ":"))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "rpq_fx": text,
                "rpq_fx_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return _write(tensors, Path(path), metadata)


def save_dense(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write an ordinary dense checkpoint of the converted ``model``: the original parameter names
    with the decompressed weights, plus the dense leftovers, as safetensors.

    ``safetensors.torch.load_model(original, path)`` (or ``original.load_state_dict(
    safetensors.torch.load_file(path), strict=False)``) then gives the dense model that computes what
    ``model`` computes. A tied weight is stored once, under its first name (the others are listed in
    the metadata under ``"tied"``): loading it fills all of them.
    """
    dense = decompress(model)
    if not dense:
        raise ValueError(f"save_dense: {type(model).__name__} holds no RPQ weight; save its state_dict directly")
    rpq = _rpq_paths(model)
    state = {name: t for name, t in model.state_dict(keep_vars=True).items()
             if name.rpartition(".")[0] not in rpq and not _FX_CONSTANT.fullmatch(name)}
    state.update(dense)
    tensors, tied = _unique(state)
    metadata = {"format": DENSE_FORMAT, "format_version": str(FORMAT_VERSION), "tied": json.dumps(tied)}
    return _write(tensors, Path(path), metadata)


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------
# reading and checking the file


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors header (tensor entries) and its metadata, after checking the file's length."""
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise RPQCheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER or 8 + length > size:
            raise RPQCheckpointError(f"{path}: not a safetensors file, or truncated: its header claims {length} "
                                     f"bytes and the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RPQCheckpointError(f"{path}: damaged safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise RPQCheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    except (TypeError, KeyError, IndexError):
        raise RPQCheckpointError(f"{path}: damaged safetensors header (bad tensor entry)") from None
    expected = 8 + length + end
    if size < expected:
        raise RPQCheckpointError(f"{path}: truncated: {size} bytes, but its header describes {expected}")
    if size > expected:
        raise RPQCheckpointError(f"{path}: {size - expected} unexpected bytes after the tensor data "
                                 "(damaged or appended to)")
    return header, metadata


def _info(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The checked ``rpq_fx`` JSON of a checkpoint: right format, readable version, intact digest."""
    fmt = metadata.get("format")
    if fmt == DENSE_FORMAT:
        raise RPQCheckpointError(f"{path}: a dense checkpoint written by rpq_fx.save_dense, not an RPQ checkpoint; "
                                 "load it into the original model with load_state_dict(safetensors.torch.load_file(path), strict=False)")
    if fmt != FORMAT:
        raise RPQCheckpointError(f"{path}: not an rpq_fx checkpoint (safetensors metadata format={fmt!r}, "
                                 f"expected {FORMAT!r}); write one with rpq_fx.save")
    version = metadata.get("format_version", "")
    if not version.isdigit():
        raise RPQCheckpointError(f"{path}: unreadable format_version {version!r}")
    if int(version) != FORMAT_VERSION:
        newer = int(version) > FORMAT_VERSION
        raise RPQCheckpointError(
            f"{path}: rpq_fx checkpoint format version {version}, but this rpq_fx ({_version()}) reads version "
            f"{FORMAT_VERSION}" + ("; upgrade rpq_fx to load it" if newer else "; convert and save the model again"))
    text = metadata.get("rpq_fx", "")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("rpq_fx_sha256"):
        raise RPQCheckpointError(f"{path}: its rpq_fx metadata does not match its checksum: the file was modified "
                                 "or damaged")
    try:
        info = json.loads(text)
        for key in ("config", "layers", "architecture", "code", "aliases", "sha256"):
            info[key]  # noqa: B018 (presence check)
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RPQCheckpointError(f"{path}: incomplete rpq_fx metadata ({type(error).__name__}: {error})") from None
    return info


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an RPQ checkpoint (checked, no tensor read), plus ``format_version``,
    ``file_bytes`` and ``tensors`` (name -> ``{"dtype", "shape", "bytes"}``)."""
    path = Path(path)
    header, metadata = _read_header(path)
    info = _info(path, metadata)
    info["format_version"] = int(metadata["format_version"])
    info["file_bytes"] = path.stat().st_size
    info["tensors"] = {name: {"dtype": e["dtype"], "shape": e["shape"], "bytes": e["data_offsets"][1] - e["data_offsets"][0]}
                       for name, e in sorted(header.items())}
    return info


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def checkpoint_report(path: str | os.PathLike) -> Report:
    """The :func:`rpq_fx.report` of a saved model, from the file's metadata alone (no model needed)."""
    info = checkpoint_info(path)
    stub = nn.Module()
    stub.rpq_layers = [_layer_from_record(r) for r in info["layers"]]
    stub.rpq_path = info.get("path")
    for i, entry in enumerate(info["tensors"].values()):
        dtype = _ST_DTYPES.get(entry["dtype"], torch.uint8)
        shape = entry["shape"] if dtype in _ST_DTYPES.values() else [entry["bytes"]]
        stub.register_buffer(f"t{i}", torch.empty(shape, dtype=dtype, device="meta"))
    return report(stub)


# ---------------------------------------------------------------------------------------------------
# load


def _listing(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _describe(entry: list) -> str:
    shape, dtype = entry[0], entry[1]
    return f"{list(shape)} {dtype}"


def _architecture_error(path: Path, saved: dict, here: dict[str, list], here_class: str, what: str) -> None:
    saved_entries = {e[0]: e[1:] for e in saved["tensors"]}
    if what == "params":  # before conversion: the saved parameters must all be in the model, alike
        saved_entries = {k: v for k, v in saved_entries.items() if v[2] == "param"}
        extra = []
    else:
        extra = [name for name in here if name not in saved_entries]
    missing = [name for name in saved_entries if name not in here]
    differ = [f"{name} (saved {_describe(saved_entries[name])}, here {_describe(here[name])})"
              for name in saved_entries if name in here and list(here[name][:2]) != list(saved_entries[name][:2])]
    if not (missing or extra or differ):
        return
    parts = [f"{len(missing)} saved tensors missing here: {_listing(missing)}" if missing else "",
             f"{len(extra)} tensors here not in the file: {_listing(extra)}" if extra else "",
             f"{len(differ)} differ: {_listing(differ, 3)}" if differ else ""]
    raise RPQCheckpointError(
        f"{path} was saved from another architecture ({saved['class']}, {len(saved['tensors'])} tensors) than this "
        f"{here_class}: " + "; ".join(p for p in parts if p))


def _check_parameters(path: Path, model: nn.Module, saved: dict) -> None:
    """Before converting: every saved parameter exists in ``model`` with the same shape and dtype."""
    here = {name: [list(p.shape), _dtype_name(p.dtype), "param"]
            for name, p in model.named_parameters(remove_duplicate=False)}
    _architecture_error(path, saved, here, type(model).__name__, "params")


def _exclusions(layers: list[dict]) -> Any:
    """A ``filter_fn`` that leaves dense exactly the layers a ``filter_fn`` excluded when saving."""
    excluded = {alias for r in layers if r.get("excluded") and r.get("reason") == "excluded by filter_fn"
                for alias in r["aliases"]}
    if not excluded:
        return None
    return lambda layer, name: name not in excluded and f"{name}.weight" not in excluded


def _first_difference(saved: str, here: str) -> str:
    a, b = saved.splitlines(), here.splitlines()
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {i + 1}: saved `{x.strip()}`, here `{y.strip()}`"
    return f"saved code has {len(a)} lines, here {len(b)}"


_HOW_FILLED = {"init", "fit_error"}  # how the saved values were found: the loaded ones are read, not fitted


def _unfitted(config: RPQConfig) -> RPQConfig:
    """``config`` with every ``init`` random: loading reads the fitted values instead of fitting again."""
    overrides = {pattern: {**values, "init": "random"} if "init" in values else values
                 for pattern, values in config.overrides.items()}
    return dataclasses.replace(config, init="random", overrides=overrides)


def _check_converted(path: Path, gm: nn.Module, info: dict, check_forward: bool) -> None:
    here = _architecture(gm)
    if here["fingerprint"] != info["architecture"]["fingerprint"]:
        _architecture_error(path, info["architecture"], {e[0]: e[1:] for e in here["tensors"]}, here["class"], "all")
        raise RPQCheckpointError(f"{path}: architecture fingerprint differs from this model's")
    saved_layers, layers = info["layers"], [_layer_record(layer) for layer in gm.rpq_layers]
    saved_by_name = {r["name"]: r for r in saved_layers}
    for record in layers:
        saved = saved_by_name.get(record["name"])
        common = set(record) & set(saved or {}) - _HOW_FILLED
        if saved is None or any(saved[k] != record[k] for k in common):
            keys = sorted(k for k in common if saved[k] != record[k]) if saved else []
            detail = "; ".join(f"{k}: saved {saved[k]!r}, here {record[k]!r}" for k in keys) or "not in the saved record"
            raise RPQCheckpointError(
                f"{path}: converting this model with the saved config gives a different result for "
                f"'{record['name']}' ({detail}); the file was written by rpq_fx {info.get('rpq_fx_version')} "
                f"(this is {_version()})")
    if len(layers) != len(saved_layers):
        raise RPQCheckpointError(f"{path}: the saved record has {len(saved_layers)} weights, this model {len(layers)}")
    codes, saved_codes = _codes(gm), info["code"]
    for mode in [m for m in codes if m in saved_codes and check_forward]:
        if codes[mode] != saved_codes[mode]:
            where = f"{mode.rpartition(':')[0]} in {mode.rpartition(':')[2]}" if ":" in mode else f"{mode}"
            raise RPQCheckpointError(
                f"{path}: this model has the saved tensors but computes something else: its converted ({where} mode) "
                f"forward differs at {_first_difference(saved_codes[mode], codes[mode])} (saved with torch "
                f"{info.get('torch_version')}, this is {torch.__version__}; pass check_forward=False to load anyway)")


def _read_tensors(path: Path, header: dict, info: dict, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stored tensor, read and checked against the model's shapes and dtypes and the file's digests."""
    aliases, digests = info["aliases"], info["sha256"]
    wanted = {aliases.get(name, name) for name in expected}
    stored = set(header)
    if stored != wanted or set(digests) != stored:
        raise RPQCheckpointError(f"{path}: its tensors do not match this model's: missing "
                                 f"{_listing(sorted(wanted - stored)) or 'none'}, unexpected "
                                 f"{_listing(sorted(stored - wanted)) or 'none'}")
    groups: dict[int, set[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), set()).add(aliases.get(name, name))
    shared = [names for names in groups.values() if len(names) > 1]
    if shared:
        raise RPQCheckpointError(f"{path}: tensors shared in this model are stored apart in the file: "
                                 f"{_listing(sorted(shared[0]))}")
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in sorted(stored):
                tensor = f.get_tensor(name)
                if _digest(tensor) != digests[name]:
                    raise RPQCheckpointError(f"{path}: tensor '{name}' does not match its checksum: the file was "
                                             "modified or damaged")
                # reason: safetensors hands out tensors at any byte offset of its read buffer; a copy owns
                # aligned memory, as the saved model's tensors did (SIMD kernels may take another path otherwise)
                out[name] = tensor.clone()
    except SafetensorError as error:
        raise RPQCheckpointError(f"{path}: damaged safetensors file ({error})") from None
    for name, tensor in expected.items():
        value = out[aliases.get(name, name)]
        if value.shape != tensor.shape or value.dtype != tensor.dtype:
            raise RPQCheckpointError(f"{path}: '{name}' is {list(value.shape)} {_dtype_name(value.dtype)} in the file, "
                                     f"{list(tensor.shape)} {_dtype_name(tensor.dtype)} in this model")
    return out


def _assign(gm: nn.Module, expected: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
            aliases: dict[str, str], device: torch.device) -> None:
    params: dict[str, nn.Parameter] = {}
    moved = {name: t.to(device) for name, t in values.items()}
    for name, tensor in expected.items():
        key = aliases.get(name, name)
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if attr in owner._parameters:
            if key not in params:
                params[key] = nn.Parameter(moved[key], requires_grad=tensor.requires_grad)
            owner._parameters[attr] = params[key]
        else:
            owner._buffers[attr] = moved[key]


def load(model: nn.Module, path: str | os.PathLike, *, device: str | torch.device = "cpu",
         check_forward: bool = True, example_inputs: Any = None) -> nn.Module:
    """Rebuild the converted model saved at ``path`` from ``model``, its original architecture.

    ``model`` may live on the meta device (``with torch.device("meta"): model = Net()``): it is
    converted with the saved config, so nothing dense is allocated, and the saved tensors are read
    onto ``device``. The result's outputs are bit-identical to the saved model's. ``model`` itself
    is not modified. A file from another architecture, a damaged or tampered file or an unknown
    format version raises :class:`RPQCheckpointError` before anything is loaded. ``check_forward``
    also compares the converted forward code with the saved one. A model converted with
    ``example_inputs`` (a torch.export capture) needs the same ``example_inputs`` here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be the original torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    header, metadata = _read_header(path)
    info = _info(path, metadata)
    try:
        config = RPQConfig.from_dict(info["config"])
    except (TypeError, ValueError) as error:
        raise RPQCheckpointError(f"{path}: its config cannot be read by this rpq_fx ({_version()}; saved by "
                                 f"{info.get('rpq_fx_version')}): {error}") from None
    _check_parameters(path, model, info["architecture"])
    capture = info.get("path")
    extra = {}
    if example_inputs is not None:
        extra["example_inputs"] = example_inputs
    elif capture == "torch.export":
        raise RPQCheckpointError(f"{path} was converted from a torch.export capture: pass example_inputs= (inputs of "
                                 "the shapes it was converted with) to load it")
    gm = convert(model, config=_unfitted(config), filter_fn=_exclusions(info["layers"]), **extra)
    _check_converted(path, gm, info, check_forward)
    saved = {r["name"]: r for r in info["layers"]}
    for layer in gm.rpq_layers:
        for key in _HOW_FILLED & saved[layer.name].keys():
            setattr(layer, key, saved[layer.name][key])
    if isinstance(gm, RPQGraphModule):
        gm.meta["rpq_config"] = config
    else:
        gm.rpq_config = config
    expected = _tensors(gm)
    values = _read_tensors(path, header, info, expected)
    _assign(gm, expected, values, info["aliases"], torch.device(device))
    return gm
