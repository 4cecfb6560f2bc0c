"""``save`` / ``load`` / ``save_dense``: RPQ checkpoints as safetensors, with no pickle anywhere.

An RPQ checkpoint is one safetensors file:

- tensors: every parameter and buffer of the converted model, each stored once under its first
  name (codebooks in their dtype, codes as uint8 / int16, dense leftovers: biases, norms, layers
  left dense); the other names of a shared tensor (a tied weight) are listed as aliases;
- metadata: ``format = "rpq_fx"``, ``format_version``, and ``rpq_fx``: one JSON document with the
  ``RPQConfig``, the conversion record (format 2: one entry per weight, its plan, its settings and
  how it was filled, apart: ``layer_record``; format-1 files still load), the
  architecture (every original tensor name, shape and dtype, and their fingerprint), the generated
  forward code, the aliases, a SHA-256 per tensor, the versions that wrote it and optionally the
  ``spec`` the model was built from; ``rpq_fx_sha256`` is the digest of that JSON.

``load(model, path)`` converts ``model`` (the original architecture, on the meta device if you
like) with the saved config, checks that the result has exactly the saved structure, reads and
verifies every tensor, and only then puts them in: any error leaves nothing half-loaded. Nothing
from the file is trusted: the digests detect damage, not edits, so every value that indexes
memory or sizes an allocation is checked on its own (docs/checkpoints.md).
"""

import ast
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import stat
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._lookup_compat import graph_before_lookups, padding_rows_before_lookups, written_before_lookups
from .config import LAYER_SETTINGS, NEW_DEFAULTS, LayerSettings, RPQConfig, dtype_name, without_new_defaults
from .convert import convert
from .decompress import decompress
from .distributed import gather_whole, is_data_parallel, is_sharded, original_class, require_process_group, unwrap
from .errors import RPQConversionError
from .graph_module import graph_parts
from .nn.weight import RPQWeight, check_index
from .passes import LayerPlan
from .record import FILLS, ConversionRecord, FitOutcome, attach_record, conversion_record
from .report import Report, report

__all__ = ["save", "load", "save_dense", "checkpoint_info", "checkpoint_report", "RPQCheckpointError",
           "FORMAT", "FORMAT_VERSION", "process_alive"]

FORMAT = "rpq_fx"
DENSE_FORMAT = "rpq_fx.dense"
FORMAT_VERSION = 2  # 2: each layer record holds its settings and how it was filled apart (layer_record)
_READABLE = (1, 2)  # format 1: every setting flat beside the split, ``init`` saying how the weight was filled
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_FX_CONSTANT = re.compile(r"_tensor_constant\d+")  # tensors torch.fx adds for constants in forward


class RPQCheckpointError(ValueError):
    """A checkpoint that cannot be loaded: not an rpq_fx file, damaged, another version or architecture."""


# ---------------------------------------------------------------------------------------------------
# helpers shared by save and load


def _parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise RPQCheckpointError(f"unknown dtype {_short(name)} in checkpoint metadata")
    return _DTYPES[name]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too) under every name it has."""
    return dict(chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))


def _rpq_paths(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, RPQWeight)}


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


# The format-2 layer record: these keys of the plan (its decision), "settings" (every LayerSettings
# field, or null for a weight left dense), "filled" and "fit_error" (its FitOutcome, or null).
_PLAN_KEYS = ("name", "aliases", "ops", "shape", "dtype", "transposed", "padding_rows", "reason", "excluded",
              "num_codebooks", "codebook_dim")


def _plain(value: Any) -> Any:
    """A plan's value as JSON holds it: a dtype by name, a tuple as a list."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return list(value) if isinstance(value, tuple) else value


def layer_record(layer: LayerPlan, fit: FitOutcome | None) -> dict[str, Any]:
    """The format-2 record of one weight: its plan, its settings and how it was filled."""
    record = {key: _plain(getattr(layer, key)) for key in _PLAN_KEYS}
    record["settings"] = None if layer.settings is None else without_new_defaults(dataclasses.asdict(layer.settings))
    record["filled"], record["fit_error"] = (fit.filled, fit.error) if fit is not None else (None, None)
    return record


def _v1_record(layer: LayerPlan) -> dict[str, Any]:
    """What a format-1 file recorded of ``layer`` (to compare with one), how it was filled aside; of
    a weight left dense only its plan (format 1 kept stale settings there)."""
    record = {key: _plain(getattr(layer, key)) for key in _PLAN_KEYS}
    if layer.converted:
        s = layer.settings
        record.update(num_codes=s.num_codes, shared_codebooks=s.shared_codebooks, codebook_dtype=s.codebook_dtype,
                      error_feedback=s.error_feedback, asymmetric=s.asymmetric, damp=s.damp, hot_rows=layer.hot_rows,
                      hot_codebook_dim=s.hot_codebook_dim if s.hot_rows else None)
    else:
        del record["num_codebooks"], record["codebook_dim"]
    return record


def _asked(fit: FitOutcome) -> str:
    """The ``init`` setting that fills a weight as ``fit`` says it was filled."""
    return "random" if fit.filled == "random" else "kmeans"


def _settings(path: Path, where: str, values: dict[str, Any]) -> LayerSettings:
    """A record's settings, checked as a config's are; a setting the record lacks (added to rpq_fx after
    the file was written) reads as its default."""
    unknown = sorted(set(values) - set(LAYER_SETTINGS))
    if unknown:
        _refuse(path, where, f"an object of the settings {', '.join(LAYER_SETTINGS)}", unknown)
    try:
        return LayerSettings(**values)
    except ValueError as error:
        raise RPQCheckpointError(f"{path}: damaged or crafted file: {where}: {error}") from None


def layer_from_record(path: Path, i: int, record: dict[str, Any],
                       version: int) -> tuple[LayerPlan, FitOutcome | None]:
    """The plan and fit outcome a (checked) layer record of format ``version`` stands for."""
    converted, settings = record.get("reason") is None, None
    if version == 1:
        fit = FitOutcome(record.get("init", "random"), record.get("fit_error")) if converted else None
        if converted:  # the split as it came out, and the init that fills the weight as it was
            values = {k: record[k] for k in LAYER_SETTINGS if k in _LAYER_FIELDS and k in record}
            values.update(codebook_dim=None, init=_asked(fit))
            settings = _settings(path, f"layers[{i}]", values)
    else:
        fit = FitOutcome(record["filled"], record["fit_error"]) if converted else None
        settings = _settings(path, f"layers[{i}].settings", record["settings"]) if converted else None
    plan = LayerPlan(record["name"], tuple(record["aliases"]), tuple(record["ops"]), tuple(record["shape"]),
                     _parse_dtype(record["dtype"]), settings, record.get("num_codebooks") if converted else None,
                     record.get("codebook_dim") if converted else None, record.get("reason"),
                     record.get("excluded", False), record.get("transposed", False),
                     tuple(record.get("padding_rows", ())))
    return plan, fit


def _saved_layers(path: Path, info: dict) -> list[tuple[LayerPlan, FitOutcome | None]]:
    """Every layer record of a checked file as a plan and how its weight was filled."""
    return [layer_from_record(path, i, r, info["format_version"]) for i, r in enumerate(info["layers"])]


def _architecture(model: nn.Module, record: ConversionRecord) -> dict[str, Any]:
    """The original model's tensors as the converted one implies them: name, shape, dtype, kind."""
    rpq = _rpq_paths(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    entries: dict[str, list] = {}
    for name, tensor in _tensors(model).items():
        if name.rpartition(".")[0] not in rpq:
            entries[name] = [list(tensor.shape), dtype_name(tensor.dtype), "param" if name in params else "buffer"]
    for layer in record.layers:
        if layer.converted:
            entries.update(dict.fromkeys(layer.aliases, [list(layer.shape), dtype_name(layer.dtype), "param"]))
    tensors = [[name, *entries[name]] for name in sorted(entries)]
    fingerprint = hashlib.sha256(json.dumps(tensors, separators=(",", ":")).encode()).hexdigest()
    return {"class": original_class(model).__name__, "tensors": tensors, "fingerprint": fingerprint}


def _mode_name(training: bool) -> str:
    return "train" if training else "eval"


def _codes(model: nn.Module, checkpoint_before_lookups: bool | None = None) -> dict[str, str]:
    """The generated forward of each graph and each mode it has a graph for: ``{"train": code}``,
    ``{"train": ..., "eval": ...}``, or for a model converted in place ``{"<part>:train": ...}``; each graph as
    rpq_fx wrote it before lookup weights where ``checkpoint_before_lookups`` is set (to the config's
    ``checkpoint``: :func:`~rpq_fx._lookup_compat.graph_before_lookups`)."""
    codes = {}
    for name, gm in graph_parts(model):
        graphs = gm.meta.get("rpq_mode_graphs") or {gm.training: gm.graph}
        for mode, graph in graphs.items():
            if checkpoint_before_lookups is not None:
                graph = graph_before_lookups(gm, graph, checkpoint_before_lookups)
            codes[f"{name}:{_mode_name(mode)}" if name else _mode_name(mode)] = graph.python_code("self").src
    return codes


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the owner of a temporary file or folder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """safetensors, written to a hidden ``.NAME.tmp-PID`` first and renamed into place, so a crash or
    a kill never leaves half a checkpoint under ``path``; the temporary files of writers that were
    killed (their process gone) are removed on the next write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            stale.unlink(missing_ok=True)
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
    (e.g. ``"timm:resnet18"``) records how to build the original architecture again, for people:
    ``rpq-fx inspect`` shows it and never builds it. Load the file with :func:`load`.

    A model wrapped for distributed training (``DistributedDataParallel``, FSDP2's ``fully_shard``)
    is saved by rank 0 alone, the same file as the unwrapped model's: every rank must call ``save``
    (FSDP2's sharded parameters are gathered onto rank 0 alone, one at a time) and returns once the
    file is written.
    """
    replicated = isinstance(model, nn.Module) and is_data_parallel(model)
    model = unwrap(model) if isinstance(model, nn.Module) else model
    record = conversion_record(model) if isinstance(model, nn.Module) else None
    if record is None:
        raise TypeError(f"save: expected a model returned by rpq_fx.convert or rpq_fx.load (it carries a "
                        f"conversion record), got a {type(model).__name__} without one; for a dense model use "
                        "safetensors directly")
    sharded = is_sharded(model)
    if sharded:
        require_process_group("save of a sharded (FSDP2) model")
    named = _tensors(model)
    on_meta = [name for name, t in named.items() if t.is_meta]
    if on_meta:
        raise ValueError(f"save: {len(on_meta)} tensors are on the meta device and hold no values "
                         f"(first: '{on_meta[0]}'); load or initialise the weights before saving")
    collective = sharded or replicated
    writer = not collective or dist.get_rank() == 0  # the writing rank is 0 (global)
    if sharded:
        named = _gathered(named, writer)
    if not collective:
        _save(model, record, named, Path(path), spec)
        return Path(path)
    failed = None
    if writer:
        try:
            _save(model, record, named, Path(path), spec)
        except Exception as error:
            failed = error
    # reason: every rank returns once rank 0 has written the file, or raises if it could not
    said = [None if failed is None else f"{type(failed).__name__}: {failed}"]
    dist.broadcast_object_list(said, src=0)
    if failed is not None:
        raise failed
    if said[0] is not None:
        raise RuntimeError(f"save: rank 0 could not write {path}: {said[0]}")
    return Path(path)


def _gathered(named: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """``named`` with each DTensor (a shard) gathered whole onto rank 0, in the same order on every
    rank (one collective per tensor, each tensor once); the ranks that do not ``keep`` them get {}."""
    from torch.distributed.tensor import DTensor

    whole: dict[int, torch.Tensor | None] = {}
    for tensor in named.values():
        if isinstance(tensor, DTensor) and id(tensor) not in whole:
            whole[id(tensor)] = gather_whole(tensor)
    return {name: whole.get(id(t), t) for name, t in named.items()} if keep else {}


def _save(model: nn.Module, record: ConversionRecord, named: dict[str, torch.Tensor], path: Path,
          spec: str | None) -> Path:
    """Write the checkpoint of ``model`` whose tensors are ``named`` (whole, on this process)."""
    tensors, aliases = _unique(named)
    info = {
        "rpq_fx_version": _version(),
        "torch_version": torch.__version__,
        "config": without_new_defaults(record.config.to_dict()),
        "layers": [layer_record(layer, record.fits.get(layer.name)) for layer in record.layers],
        "architecture": _architecture(model, record),
        "code": _codes(model),
        "aliases": aliases,
        "sha256": {name: _digest(t) for name, t in tensors.items()},
        "spec": spec,
        "path": record.path,
    }
    text = json.dumps(info, sort_keys=True, separators=(",", ":"))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "rpq_fx": text,
                "rpq_fx_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return _write(tensors, path, metadata)


def save_dense(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write an ordinary dense checkpoint of the converted ``model``: the original parameter names
    with the decompressed weights, plus the dense leftovers, as safetensors.

    ``safetensors.torch.load_model(original, path)`` (or ``original.load_state_dict(
    safetensors.torch.load_file(path), strict=False)``) then gives the dense model that computes what
    ``model`` computes. A tied weight is stored once, under its first name (the others are listed in
    the metadata under ``"tied"``): loading it fills all of them. A ``DistributedDataParallel`` model
    is saved as the model inside it (by every rank that calls this); an FSDP2-sharded one is refused.
    """
    model = unwrap(model)
    if is_sharded(model):
        raise ValueError("save_dense: the model is sharded (FSDP2's fully_shard): its codebooks are split across "
                         "ranks; save it with rpq_fx.save (which gathers them on rank 0), load that file into an "
                         "unwrapped model and call save_dense on it")
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


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
              "U8": torch.uint8, "BOOL": torch.bool}
_DTYPES = {dtype_name(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(path: Path, where: str, what: str, value: Any) -> None:
    raise RPQCheckpointError(f"{path}: damaged or crafted file: {where} must be {what}, got {_short(value)}")


def _is_dtype(value: Any, names: dict) -> bool:
    return isinstance(value, str) and value in names


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and value >= low


def _is_dims(value: Any, low: int = 0) -> bool:
    return isinstance(value, list) and len(value) <= 64 and all(_is_int(v, low) for v in value)


def _is_strs(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


_MAX_DEPTH = 16  # the format nests 5 deep (config -> overrides -> pattern -> values); readers recurse on it


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests, found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _json(path: Path, text: str | bytes, what: str) -> Any:
    """``text`` parsed, at most ``_MAX_DEPTH`` deep: json.dumps, deepcopy and the report recurse on it."""
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        # reason: deep nesting raises RecursionError from the parser; it is a damaged file like any other
        raise RPQCheckpointError(f"{path}: damaged {what} ({type(error).__name__}: {str(error)[:80]})") from None
    if _depth(value) > _MAX_DEPTH:
        raise RPQCheckpointError(f"{path}: damaged or crafted file: its {what} nests {_depth(value)} deep "
                                 f"(at most {_MAX_DEPTH} accepted)")
    return value


def _check_entries(path: Path, header: dict[str, Any]) -> int:
    """Every tensor entry well formed (known dtype, shape, offsets that tile the data with no gap or
    overlap and match shape x itemsize); returns the data's length."""
    spans = []
    for name, entry in header.items():
        where = f"tensor {_short(name)}"
        if not isinstance(entry, dict):
            _refuse(path, where, "an object", entry)
        if not _is_dtype(entry.get("dtype"), SAFETENSORS_DTYPES):
            _refuse(path, f"{where} dtype", f"one of {', '.join(SAFETENSORS_DTYPES)}", entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not _is_dims(shape):
            _refuse(path, f"{where} shape", "a list of ints >= 0", shape)
        if not (_is_dims(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
            _refuse(path, f"{where} data_offsets", "[begin, end] with 0 <= begin <= end", offsets)
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            _refuse(path, f"{where} data_offsets", f"{nbytes} bytes apart (its shape x dtype size)", offsets)
        if math.prod(max(d, 1) for d in shape) > 2**48:
            _refuse(path, f"{where} shape", "of a plausible size", shape)
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            problem = "overlap" if begin < end else "has a gap"
            raise RPQCheckpointError(f"{path}: damaged or crafted file: tensor data {problem} at byte {min(begin, end)}")
        end = stop
    return end


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The safetensors header (tensor entries, each checked) and its metadata, after checking that
    ``path`` is a regular file of exactly the length the header describes."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such checkpoint file: {path}") from None
    if stat.S_ISDIR(mode):
        raise RPQCheckpointError(f"{path} is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise RPQCheckpointError(f"{path} is not a regular file (a device, pipe or socket): rpq_fx reads checkpoints "
                                 "from regular files only")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise RPQCheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER or 8 + length > size:
            raise RPQCheckpointError(f"{path}: not a safetensors file, or truncated: its header claims {length} "
                                     f"bytes and the file has {size}")
        header = _json(path, f.read(length), "safetensors header")
    if not isinstance(header, dict):
        raise RPQCheckpointError(f"{path}: damaged safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and _is_str_map(metadata)):
        _refuse(path, "the safetensors __metadata__", "an object of strings", metadata)
    expected = 8 + length + _check_entries(path, header)
    if size < expected:
        raise RPQCheckpointError(f"{path}: truncated: {size} bytes, but its header describes {expected}")
    if size > expected:
        raise RPQCheckpointError(f"{path}: {size - expected} unexpected bytes after the tensor data "
                                 "(damaged or appended to)")
    return header, metadata


# The format-1 conversion record: field -> (check, what it must be, default when absent). Fields
# not listed are ignored; a converted layer (reason None) also needs its split (_SPLIT).
_OPTIONAL_INT = (lambda v: v is None or _is_int(v, 1), "null or an int >= 1")
_LAYER_FIELDS = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "aliases": (lambda v: _is_strs(v) and len(v) >= 1, "a non-empty list of strings"),
    "ops": (_is_strs, "a list of strings"),
    "shape": (lambda v: _is_dims(v, 1) and len(v) >= 1, "a non-empty list of ints >= 1"),
    "dtype": (lambda v: _is_dtype(v, _DTYPES), "a torch dtype name"),
    "num_codebooks": _OPTIONAL_INT,
    "codebook_dim": _OPTIONAL_INT,
    "num_codes": (lambda v: v is None or (_is_int(v, 2) and v <= 65536), "null or an int in [2, 65536]"),
    "shared_codebooks": (lambda v: isinstance(v, bool), "true or false"),
    "reason": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "excluded": (lambda v: isinstance(v, bool), "true or false"),
    "transposed": (lambda v: isinstance(v, bool), "true or false"),
    "padding_rows": (_is_dims, "a list of ints >= 0"),
    "codebook_dtype": (lambda v: v is None or _is_dtype(v, _DTYPES), "null or a torch dtype name"),
    "init": (lambda v: v in FILLS, f"one of {', '.join(FILLS)}"),
    "error_feedback": (lambda v: isinstance(v, bool), "true or false"),
    "asymmetric": (lambda v: isinstance(v, bool), "true or false"),
    "damp": (lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "fit_error": (lambda v: v is None or type(v) in (int, float), "null or a number"),
    "hot_rows": (lambda v: _is_int(v), "an int >= 0"),
    "hot_codebook_dim": _OPTIONAL_INT,
}
_REQUIRED = ("name", "aliases", "ops", "shape", "dtype")
_SPLIT = ("num_codebooks", "codebook_dim", "num_codes")
# The format-2 record (layer_record): every key required, none other accepted.
_V2_FIELDS = {**{key: _LAYER_FIELDS[key] for key in _PLAN_KEYS},
              "settings": (lambda v: v is None or isinstance(v, dict), "null or an object"),
              "filled": (lambda v: v is None or v in FILLS, f"null or one of {', '.join(FILLS)}"),
              "fit_error": _LAYER_FIELDS["fit_error"]}


def check_layer_record(path: Path, i: int, record: Any) -> None:
    if not isinstance(record, dict):
        _refuse(path, f"layers[{i}]", "an object", record)
    if set(record) != set(_V2_FIELDS):
        _refuse(path, f"layers[{i}]", f"an object of exactly {', '.join(_V2_FIELDS)}", sorted(record))
    for key, (ok, what) in _V2_FIELDS.items():
        if not ok(record[key]):
            _refuse(path, f"layers[{i}].{key}", what, record[key])
    converted = record["reason"] is None
    for key in ("num_codebooks", "codebook_dim", "settings", "filled"):
        if (record[key] is None) == converted:
            _refuse(path, f"layers[{i}].{key} (a {'converted' if converted else 'dense'} weight)",
                    "set" if converted else "null", record[key])
    if converted and record["transposed"] and len(record["shape"]) != 2:
        _refuse(path, f"layers[{i}].shape (a transposed weight)", "two dims", record["shape"])
    if converted:
        _settings(path, f"layers[{i}].settings", record["settings"])


def _check_layer(path: Path, i: int, record: Any) -> None:
    if not isinstance(record, dict):
        _refuse(path, f"layers[{i}]", "an object", record)
    for key in _REQUIRED:
        if key not in record:
            _refuse(path, f"layers[{i}]", f"an object with {key!r}", sorted(record))
    for key, (ok, what) in _LAYER_FIELDS.items():
        if key in record and not ok(record[key]):
            _refuse(path, f"layers[{i}].{key}", what, record[key])
    if record.get("reason") is None:
        for key in _SPLIT:
            if record.get(key) is None:
                _refuse(path, f"layers[{i}].{key} (a converted weight)", "an int", record.get(key))
        if record.get("transposed") and len(record["shape"]) != 2:
            _refuse(path, f"layers[{i}].shape (a transposed weight)", "two dims", record["shape"])
        if record.get("hot_rows") and record.get("hot_codebook_dim") is None:
            _refuse(path, f"layers[{i}].hot_codebook_dim (a weight with hot rows)", "an int", None)


def _check_info(path: Path, info: Any, version: int) -> None:
    """The ``rpq_fx`` JSON's schema (format 1 or 2): every value later code indexes or sizes with is typed."""
    if not isinstance(info, dict):
        _refuse(path, "the rpq_fx metadata", "a JSON object", info)
    checks = {"config": (lambda v: isinstance(v, dict), "an object"),
              "layers": (lambda v: isinstance(v, list), "a list"),
              "architecture": (lambda v: isinstance(v, dict), "an object"),
              "code": (lambda v: _is_str_map(v), "an object of strings"),
              "aliases": (lambda v: _is_str_map(v), "an object of strings"),
              "sha256": (lambda v: _is_str_map(v), "an object of strings"),
              "spec": (lambda v: v is None or isinstance(v, str), "null or a string"),
              "path": (lambda v: v is None or isinstance(v, str), "null or a string"),
              "rpq_fx_version": (lambda v: v is None or isinstance(v, str), "null or a string"),
              "torch_version": (lambda v: v is None or isinstance(v, str), "null or a string")}
    for key, (ok, what) in checks.items():
        if key not in info and key in ("config", "layers", "architecture", "code", "aliases", "sha256"):
            raise RPQCheckpointError(f"{path}: incomplete rpq_fx metadata (no {key!r})")
        if key in info and not ok(info[key]):
            _refuse(path, f"rpq_fx metadata {key!r}", what, info[key])
    for i, record in enumerate(info["layers"]):
        (_check_layer if version == 1 else check_layer_record)(path, i, record)
    arch = info["architecture"]
    if not isinstance(arch.get("class"), str) or not isinstance(arch.get("fingerprint"), str):
        _refuse(path, "architecture", "an object with 'class' and 'fingerprint' strings", sorted(arch))
    tensors = arch.get("tensors")
    if not isinstance(tensors, list):
        _refuse(path, "architecture.tensors", "a list", tensors)
    for i, entry in enumerate(tensors):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and _is_dims(entry[1])
                and _is_dtype(entry[2], _DTYPES) and entry[3] in ("param", "buffer")):
            _refuse(path, f"architecture.tensors[{i}]", "[name, shape, dtype, 'param' or 'buffer']", entry)


def _info(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The checked ``rpq_fx`` JSON of a checkpoint: right format, readable version, intact digest, and
    every field of the expected type (the digest guards against accidents, the checks against edits)."""
    fmt = metadata.get("format")
    if fmt == DENSE_FORMAT:
        raise RPQCheckpointError(f"{path}: a dense checkpoint written by rpq_fx.save_dense, not an RPQ checkpoint; "
                                 "load it into the original model with load_state_dict(safetensors.torch.load_file(path), strict=False)")
    if fmt != FORMAT:
        raise RPQCheckpointError(f"{path}: not an rpq_fx checkpoint (safetensors metadata format={_short(fmt)}, "
                                 f"expected {FORMAT!r}); write one with rpq_fx.save")
    version = metadata.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) < 6):
        raise RPQCheckpointError(f"{path}: unreadable format_version {_short(version)}")
    if int(version) not in _READABLE:
        newer = int(version) > FORMAT_VERSION
        raise RPQCheckpointError(
            f"{path}: rpq_fx checkpoint format version {version}, but this rpq_fx ({_version()}) reads versions "
            f"{', '.join(map(str, _READABLE))}" + ("; upgrade rpq_fx to load it" if newer
                                                   else "; convert and save the model again"))
    text = metadata.get("rpq_fx", "")
    if hashlib.sha256(text.encode()).hexdigest() != metadata.get("rpq_fx_sha256"):
        raise RPQCheckpointError(f"{path}: its rpq_fx metadata does not match its checksum: the file was modified "
                                 "or damaged")
    info = _json(path, text, "rpq_fx metadata")
    _check_info(path, info, int(version))
    info["format_version"] = int(version)
    return info


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an RPQ checkpoint (checked, no tensor read), plus ``format_version``,
    ``file_bytes`` and ``tensors`` (name -> ``{"dtype", "shape", "bytes"}``); the config with every
    setting, those a file leaves out at their default (``additive_codebooks=1``) filled in."""
    path = Path(path)
    header, metadata = read_header(path)
    info = _info(path, metadata)
    info["config"] = {**NEW_DEFAULTS, **info["config"]}
    info["file_bytes"] = path.stat().st_size
    info["tensors"] = {name: {"dtype": e["dtype"], "shape": e["shape"], "bytes": e["data_offsets"][1] - e["data_offsets"][0]}
                       for name, e in sorted(header.items())}
    return info


def checkpoint_report(path: str | os.PathLike) -> Report:
    """The :func:`rpq_fx.report` of a saved model, from the file's metadata alone (no model needed)."""
    info = checkpoint_info(path)
    stub = nn.Module()
    saved = _saved_layers(Path(path), info)
    fits = {plan.name: fit for plan, fit in saved if fit is not None}
    attach_record(stub, ConversionRecord(_config(Path(path), info), tuple(plan for plan, _ in saved), info.get("path"),
                                         fits))
    for i, entry in enumerate(info["tensors"].values()):
        stub.register_buffer(f"t{i}", torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]], device="meta"))
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
    here = {name: [list(p.shape), dtype_name(p.dtype), "param"]
            for name, p in model.named_parameters(remove_duplicate=False)}
    _architecture_error(path, saved, here, type(model).__name__, "params")


def saved_exclusions(layers: list[dict]) -> Any:
    """A ``filter_fn`` that leaves dense exactly the layers a ``filter_fn`` excluded when saving."""
    excluded = {alias for r in layers if r.get("excluded") and r.get("reason") == "excluded by filter_fn"
                for alias in r["aliases"]}
    if not excluded:
        return None
    return lambda layer, name: name not in excluded and f"{name}.weight" not in excluded


def _structure(code: str) -> list[str]:
    """The forward's operations, independent of how fx prints them: one canonical line per statement
    (``ast.unparse`` of its value, with each local name replaced by ``%i``, the statement that made it,
    an attribute read by the attribute itself, and the inputs by ``%in<position>``); fx's ``x = None``
    frees, where it put its attribute reads, comments and layout are dropped."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return [f"unparsable: {code[:80]!r}"]
    forward = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
    if forward is None:
        return ["no forward"]
    refs = {a.arg: f"%in{i}" for i, a in enumerate([*forward.args.posonlyargs, *forward.args.args][1:])}
    refs.update({a.arg: f"%in_{a.arg}" for a in forward.args.kwonlyargs})

    class Refs(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.Name(refs.get(node.id, node.id)) if node.id in refs else node

    lines = []
    for statement in forward.body:
        value = getattr(statement, "value", None)
        targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
        if isinstance(value, ast.Constant) and value.value is None and isinstance(statement, ast.Assign):
            continue
        text = ast.unparse(Refs().visit(value)) if value is not None else ast.unparse(statement)
        if re.fullmatch(r"self(\.\w+)+", text) and not isinstance(statement, ast.Return):
            ref = text  # an attribute read (fx's get_attr): written where it is used, wherever fx put it
        else:
            lines.append(f"return {text}" if isinstance(statement, ast.Return) else text)
            ref = f"%{len(lines) - 1}"
        for target in targets:
            if isinstance(target, ast.Name):
                refs[target.id] = ref
    return lines


def _by_part_and_mode(codes: dict[str, str]) -> dict[str, str]:
    """``{"part:mode": code}`` for both modes of every graph part: a part with one graph (the model
    traces alike in both modes, or was captured in one) runs that graph in either."""
    parts: dict[str, dict[str, str]] = {}
    for key, code in codes.items():
        part, _, mode = key.rpartition(":")
        parts.setdefault(part, {})[mode] = code
    return {f"{part}:{mode}": graphs.get(mode, next(iter(graphs.values())))
            for part, graphs in parts.items() for mode in ("train", "eval")}


def _check_forward(path: Path, info: dict, here_codes: dict[str, str], before_lookups: bool = False) -> None:
    """Refuse a model whose converted forward does other operations than the saved one, in either mode
    (``before_lookups``: ``here_codes`` are this model's forwards as rpq_fx wrote them before lookup weights)."""
    saved, here = _by_part_and_mode(info["code"]), _by_part_and_mode(here_codes)
    if saved.keys() != here.keys():
        parts = sorted({k.rpartition(":")[0] or "(whole model)" for k in saved.keys() ^ here.keys()})
        raise RPQCheckpointError(f"{path}: this model's converted graphs are not the saved ones: parts "
                                 f"{_listing(parts)} are in one and not the other")
    for key in sorted(saved):
        a, b = _structure(saved[key]), _structure(here[key])
        if a == b:
            continue
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        part, _, mode = key.rpartition(":")
        where = f"{part} in {mode}" if part else mode
        detail = (f"operation {i + 1}: saved `{a[i]}`, here `{b[i]}`" if i < min(len(a), len(b))
                  else f"saved forward has {len(a)} operations, here {len(b)}")
        as_written = " as rpq_fx wrote it before lookup weights, as the file was" if before_lookups else ""
        raise RPQCheckpointError(
            f"{path}: this model has the saved tensors but computes something else: its converted ({where} mode) "
            f"forward{as_written} differs at {detail} (saved with torch {info.get('torch_version')}, this is "
            f"{torch.__version__}; pass check_forward=False to load anyway)")


# how the saved values were found (format 1's init, format 2's outcome and init setting): load reads them, never fits
_HOW_FILLED = {"init", "fit_error", "filled", "settings.init"}


def comparable_record(record: dict[str, Any]) -> dict[str, Any]:
    """A layer record flat (its settings as ``settings.<name>``), without how the weight was filled."""
    flat = {key: value for key, value in record.items() if key != "settings"}
    flat.update({f"settings.{key}": value for key, value in (record.get("settings") or {}).items()})
    return {key: value for key, value in flat.items() if key not in _HOW_FILLED}


def filled_as_saved(layer: LayerPlan, fits: dict[str, FitOutcome]) -> LayerPlan:
    """``layer`` (converted with every init random) with the init that filled the saved weight."""
    if not layer.converted:
        return layer
    return dataclasses.replace(layer, settings=dataclasses.replace(layer.settings, init=_asked(fits[layer.name])))


def unfitted(config: RPQConfig) -> RPQConfig:
    """``config`` with every ``init`` random: loading reads the fitted values instead of fitting again."""
    overrides = {pattern: {**values, "init": "random"} if "init" in values else values
                 for pattern, values in config.overrides.items()}
    return dataclasses.replace(config, init="random", overrides=overrides)


def _padding_as_saved(saved: dict[str, Any] | None, here: dict[str, Any], own_rows: set[int]) -> dict[str, Any]:
    """``here`` (a comparable layer record) with the padding rows the saved one has, where they differ only by
    ``own_rows``: the rows a file written before lookup weights did not give a weight read through one."""
    if saved is None or "padding_rows" not in saved:
        return here
    rows, kept = set(here["padding_rows"]), set(saved["padding_rows"])
    return {**here, "padding_rows": saved["padding_rows"]} if rows - own_rows <= kept <= rows else here


def _check_converted(path: Path, gm: nn.Module, record: ConversionRecord, info: dict, check_forward: bool) -> None:
    here = _architecture(gm, record)
    if here["fingerprint"] != info["architecture"]["fingerprint"]:
        _architecture_error(path, info["architecture"], {e[0]: e[1:] for e in here["tensors"]}, here["class"], "all")
        raise RPQCheckpointError(f"{path}: architecture fingerprint differs from this model's")
    saved_layers = info["layers"]
    layers = [comparable_record(_v1_record(layer) if info["format_version"] == 1 else layer_record(layer, None))
              for layer in record.layers]
    saved_by_name = {r["name"]: comparable_record(r) for r in saved_layers}
    before_lookups = written_before_lookups(info["code"])
    checkpoint = record.config.checkpoint if before_lookups else None
    if before_lookups:  # reason: padding rows a file written before lookup weights never gave them (ec0be8d)
        own = padding_rows_before_lookups(gm, record.layers)
        layers = [_padding_as_saved(saved_by_name.get(r["name"]), r, own[r["name"]]) if r["name"] in own else r
                  for r in layers]
    for record in layers:
        saved = saved_by_name.get(record["name"])
        common = set(record) & set(saved or {})  # reason: a setting added since the file was written is not in it
        if saved is None or any(saved[k] != record[k] for k in common):
            keys = sorted(k for k in common if saved[k] != record[k]) if saved else []
            detail = "; ".join(f"{k}: saved {saved[k]!r}, here {record[k]!r}" for k in keys) or "not in the saved record"
            raise RPQCheckpointError(
                f"{path}: converting this model with the saved config gives a different result for "
                f"'{record['name']}' ({detail}); the file was written by rpq_fx {info.get('rpq_fx_version')} "
                f"(this is {_version()})")
    if len(layers) != len(saved_layers):
        raise RPQCheckpointError(f"{path}: the saved record has {len(saved_layers)} weights, this model {len(layers)}")
    if check_forward:
        _check_forward(path, info, _codes(gm, checkpoint), before_lookups)


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
    for name, tensor in expected.items():  # before reading anything: the file's entries must be the model's
        entry = header[aliases.get(name, name)]
        if entry["shape"] != list(tensor.shape) or SAFETENSORS_DTYPES[entry["dtype"]] != tensor.dtype:
            raise RPQCheckpointError(f"{path}: '{name}' is {entry['shape']} {dtype_name(SAFETENSORS_DTYPES[entry['dtype']])} "
                                     f"in the file, {list(tensor.shape)} {dtype_name(tensor.dtype)} in this model")
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
    return out


def _check_indices(path: Path, gm: nn.Module, values: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Every code below its weight's ``num_codes`` and every hot-row index below its row count: the
    checksums prove nothing against an edited file, and these index memory."""
    for name, weight in gm.named_modules(remove_duplicate=False):
        if isinstance(weight, RPQWeight):
            for buffer, bound in weight.index_bounds().items():
                key = f"{name}.{buffer}"
                try:
                    check_index(values[aliases.get(key, key)], weight._buffers[buffer].dtype, bound, key)
                except (IndexError, TypeError) as error:
                    raise RPQCheckpointError(f"{path}: {error}") from None


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


def _config(path: Path, info: dict) -> RPQConfig:
    try:
        return RPQConfig.from_dict(info["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise RPQCheckpointError(f"{path}: its config cannot be read by this rpq_fx ({_version()}; saved by "
                                 f"{info.get('rpq_fx_version')}): {error}") from None


def load(model: nn.Module, path: str | os.PathLike, *, device: str | torch.device = "cpu",
         check_forward: bool = True, example_inputs: Any = None) -> nn.Module:
    """Rebuild the converted model saved at ``path`` from ``model``, its original architecture.

    ``model`` may live on the meta device (``with torch.device("meta"): model = Net()``): it is
    converted with the saved config, so nothing dense is allocated, and the saved tensors are read
    onto ``device``. The result's outputs are bit-identical to the saved model's. ``model`` itself
    is not modified. A file from another architecture, a damaged or tampered file or an unknown
    format version raises :class:`RPQCheckpointError` before anything is loaded; every code, index,
    shape and offset is checked, so a crafted file cannot make a kernel read out of bounds (the
    checksums catch accidents, not edits). ``check_forward`` also compares the operations of the
    converted forward, in train and in eval mode, with the saved ones. A model converted with
    ``example_inputs`` (a torch.export capture) needs the same ``example_inputs`` here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load: model must be the original torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    header, metadata = read_header(path)
    info = _info(path, metadata)
    config = _config(path, info)
    _check_parameters(path, model, info["architecture"])
    capture = info.get("path")
    extra = {}
    if example_inputs is not None:
        extra["example_inputs"] = example_inputs
    elif capture == "torch.export":
        raise RPQCheckpointError(f"{path} was converted from a torch.export capture: pass example_inputs= (inputs of "
                                 "the shapes it was converted with) to load it")
    elif capture == "module":
        extra["capture"] = "module"  # rebuilt the way it was converted
    try:
        gm = convert(model, config=unfitted(config), filter_fn=saved_exclusions(info["layers"]), **extra)
    except RPQConversionError as error:
        raise RPQCheckpointError(f"{path}: this model cannot be converted with the saved config: {error}") from None
    record = conversion_record(gm)
    _check_converted(path, gm, record, info, check_forward)
    fits = {plan.name: fit for plan, fit in _saved_layers(path, info) if fit is not None}
    attach_record(gm, ConversionRecord(config, tuple(filled_as_saved(layer, fits) for layer in record.layers),
                                       record.path, fits))
    expected = _tensors(gm)
    values = _read_tensors(path, header, info, expected)
    _check_indices(path, gm, values, info["aliases"])
    _assign(gm, expected, values, info["aliases"], torch.device(device))
    return gm
