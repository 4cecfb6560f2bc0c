"""``RPQConfig``: what to convert and how, as one serialisable dataclass."""

import dataclasses
import fnmatch
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RPQConfig", "LayerSettings", "DAMP", "RPQ_MAX_CODEBOOK_DIM", "dtype_name", "without_new_defaults",
           "check_int", "check_float"]

SPLITS = ("num_codebooks", "codebook_dim", "max_codebook_dim")
INITS = ("random", "kmeans")
DAMP = 0.01  # GPTQ's default damping of a calibrated fit's H (RPQConfig.damp)
RPQ_MAX_CODEBOOK_DIM = 64  # rpq_fx.RPQ's (and the CLI's) default split: codewords of at most 64 values
CODEBOOK_DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_ADDITIVE = 16  # additive_codebooks above this is a typo, not a size: every stage is as big as the first
# Settings added after files were first written, at the value that changes nothing: left out of what is
# written (checkpoints, config.json), so a model that does not use them saves byte for byte as before
NEW_DEFAULTS = {"additive_codebooks": 1}


def without_new_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the settings of :data:`NEW_DEFAULTS` that hold their default."""
    return {key: value for key, value in values.items()
            if not (key in NEW_DEFAULTS and type(value) is type(NEW_DEFAULTS[key]) and value == NEW_DEFAULTS[key])}


def check_int(where: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        accepted = f"an int in [{low}, {high}]" if high is not None else f"an int >= {low}"
        raise ValueError(f"{where}: {name} must be {accepted}, got {value!r}")


def check_float(where: str, name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Refuse ``value`` unless it is a finite real number (not a bool) within ``[low, high]`` (``low_open`` /
    ``high_open``: that bound excluded; None: unbounded), naming ``where``, ``name`` and the value."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    # reason: an int is finite however large; math.isfinite would convert it to a float, and overflow past 1e308
    finite = number and (isinstance(value, numbers.Integral) or math.isfinite(value))
    if finite and not (
            low is not None and (value <= low if low_open else value < low)) and not (
            high is not None and (value >= high if high_open else value > high)):
        return
    if low is not None and high is not None:
        accepted = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None or high is not None:
        accepted = f"a number {'>' if low_open else '>='} {low}" if low is not None else \
            f"a number {'<' if high_open else '<='} {high}"
    else:
        accepted = "a finite number"
    why = ", which is not finite" if number and not finite else ""
    raise ValueError(f"{where}: {name} must be {accepted}, got {value!r}{why}")


def dtype_name(value: Any) -> Any:
    """``torch.float16`` -> ``"float16"`` (configs hold names, so they stay JSON); anything else as given."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def _size(default: Any) -> Any:
    """A setting that changes a weight's stored size (``allocate`` varies only those)."""
    return field(default=default, metadata={"size": True})


@dataclass(frozen=True)
class LayerSettings:
    """Every per-layer setting, declared here once: ``RPQConfig`` inherits them as its defaults, its
    overrides may set any of them per layer, and a conversion resolves one per layer (``LayerPlan.settings``).
    What each means: :class:`RPQConfig`. Exactly one of the three splits is set."""

    num_codebooks: int | None = _size(None)
    codebook_dim: int | None = _size(None)
    max_codebook_dim: int | None = _size(None)
    num_codes: int = _size(256)
    shared_codebooks: bool = _size(False)
    init: str = "random"
    codebook_dtype: str | None = _size(None)
    error_feedback: bool = True
    damp: float = DAMP
    asymmetric: bool = True
    hot_rows: int = _size(0)
    hot_codebook_dim: int | None = _size(None)
    additive_codebooks: int = _size(1)

    def __post_init__(self):
        object.__setattr__(self, "codebook_dtype", dtype_name(self.codebook_dtype))  # reason: the class is frozen
        self._check(dataclasses.asdict(self), type(self).__name__)

    @staticmethod
    def _check(values: dict[str, Any], where: str) -> None:
        """Raise a ValueError naming ``where``, the setting and its value if ``values`` holds a wrong setting."""
        splits = [name for name in SPLITS if values.get(name) is not None]
        if len(splits) != 1:
            raise ValueError(f"{where}: set exactly one of {', '.join(SPLITS)}; got "
                             f"{', '.join(f'{n}={values[n]}' for n in splits) if splits else 'none'}")
        check_int(where, splits[0], values[splits[0]], 1)
        check_int(where, "num_codes", values["num_codes"], 2, 65536)
        if not isinstance(values["shared_codebooks"], bool):
            raise ValueError(f"{where}: shared_codebooks must be a bool, got {values['shared_codebooks']!r}")
        if values["init"] not in INITS:
            raise ValueError(f"{where}: init must be one of {list(INITS)}, got {values['init']!r}")
        if values["codebook_dtype"] is not None and values["codebook_dtype"] not in CODEBOOK_DTYPES:
            raise ValueError(f"{where}: codebook_dtype must be None or one of {list(CODEBOOK_DTYPES)}, "
                             f"got {values['codebook_dtype']!r}")
        for name in ("error_feedback", "asymmetric"):
            if not isinstance(values[name], bool):
                raise ValueError(f"{where}: {name} must be a bool, got {values[name]!r}")
        check_float(where, "damp", values["damp"], 0, low_open=True)
        check_int(where, "hot_rows", values["hot_rows"], 0)
        check_int(where, "additive_codebooks", values["additive_codebooks"], 1, MAX_ADDITIVE)
        if values["hot_rows"] or values["hot_codebook_dim"] is not None:
            check_int(where, "hot_codebook_dim (hot_rows > 0 needs one)", values["hot_codebook_dim"], 1)

    def split(self, row_len: int) -> tuple[int, int] | str:
        """``(num_codebooks, codebook_dim)`` for a row of ``row_len`` values, or why it can't be split."""
        if self.num_codebooks is not None:
            if row_len % self.num_codebooks:
                return f"row length {row_len} is not divisible by num_codebooks={self.num_codebooks}"
            return self.num_codebooks, row_len // self.num_codebooks
        if self.codebook_dim is not None:
            if row_len % self.codebook_dim:
                return f"row length {row_len} is not divisible by codebook_dim={self.codebook_dim}"
            return row_len // self.codebook_dim, self.codebook_dim
        dim = max(d for d in range(1, min(self.max_codebook_dim, row_len) + 1) if row_len % d == 0)
        return row_len // dim, dim


LAYER_SETTINGS = tuple(f.name for f in dataclasses.fields(LayerSettings))
SIZE_SETTINGS = tuple(f.name for f in dataclasses.fields(LayerSettings) if f.metadata.get("size"))
_OVERRIDABLE = (*LAYER_SETTINGS, "skip")


@dataclass(frozen=True)
class RPQConfig(LayerSettings):
    """How to convert a model: the per-layer settings of :class:`LayerSettings` (the defaults of every
    layer), the model-wide ``checkpoint`` and ``seed``, and per-layer ``overrides``.

    Exactly one of ``num_codebooks`` (C per row), ``codebook_dim`` (d, so C = row / d) or
    ``max_codebook_dim`` (per layer the largest d <= this that divides the row) sets the split.
    ``init``: ``"random"`` (the RPQ default: train from scratch) or ``"kmeans"`` (fit the codebooks
    and codes to the model's trained weights; data-aware when ``convert`` gets ``calibration``).
    ``codebook_dtype``: store codebooks as ``"float16"`` / ``"bfloat16"`` (expanded in the weight's
    own dtype); None keeps the weight's dtype. ``error_feedback``: in a calibrated fit, push each
    quantised slice's output error onto the slices not yet quantised (GPTQ's update; it makes
    EfficientNet-Lite0 much better), or not, per layer. ``damp``: in a calibrated fit of a linear or
    convolution layer, that fraction of the inputs' Gram matrix's mean diagonal is added to its
    diagonal where it steers the slice-by-slice quantisation (GPTQ's ``damp_percent``, as a fraction):
    more leans the codes toward the plain weight error (on MiniLM 0.01 to 0.03 did best,
    ``benchmarks/damp.py``), per layer. ``asymmetric``: in a calibrated fit of a linear or convolution
    layer, match the dense model's output on the inputs the layer gets once the layers before it are
    quantised (GPTAQ's asymmetric calibration: it corrects the error they pass on; one more forward per
    fit), or, off, its own dense weight's output on them, per layer. ``hot_rows``: that many rows of each weight
    (at most; the rows whose fit error weighs most: for an embedding, the tokens the calibration
    looks up most) get a second code on top of their own, from one shared residual codebook of
    ``hot_codebook_dim`` values per codeword. ``additive_codebooks``: M, how many codes each slice
    of a row sums (additive quantization, as AQLM's: ``W[n, slice] = Σ_m codebooks_m[codes_m[n]]``),
    each stage a full set of codebooks and codes of this split, so a weight stores M times the
    codes and codebooks of one stage (d = 8 with M = 2 is 2 bits per weight, as d = 4 with M = 1);
    ``init="kmeans"`` fits stage by stage on the residual, then refines them in turn
    (:mod:`rpq_fx.fit.additive`); 1 (the default) is the plain single-code weight. ``overrides`` maps
    fnmatch patterns, tried against a weight's name (``"blocks.0.mlp.fc1.weight"``) and its layer's
    name (``"blocks.0.mlp.fc1"``), to settings that replace the defaults for the layers they match
    (later patterns win); ``{"skip": True}`` leaves a layer dense. ``convert`` warns about a pattern
    that matches no weight or layer name (a typo), and raises under ``strict=True``.
    A config is immutable: ``dataclasses.replace`` gives a changed (and checked) copy.
    """

    checkpoint: bool = False
    seed: int = 0
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.overrides, dict):
            raise ValueError(f"RPQConfig.overrides must be a dict of fnmatch patterns to settings, "
                             f"got {self.overrides!r}")
        for pattern in self.overrides:
            if not isinstance(pattern, str):
                raise ValueError(f"RPQConfig.overrides: keys must be str fnmatch patterns of weight or layer names, "
                                 f"got {pattern!r} ({type(pattern).__name__})")
        object.__setattr__(self, "codebook_dtype", dtype_name(self.codebook_dtype))  # reason: the class is frozen
        for values in self.overrides.values():
            if isinstance(values, dict) and "codebook_dtype" in values:
                values["codebook_dtype"] = dtype_name(values["codebook_dtype"])
        self._check(dataclasses.asdict(self), "RPQConfig")
        for pattern, values in self.overrides.items():
            if not isinstance(values, dict):
                raise ValueError(f"RPQConfig.overrides[{pattern!r}] must be a dict, got {values!r}")
            unknown = set(values) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(f"RPQConfig.overrides[{pattern!r}]: unknown settings {sorted(unknown)}; "
                                 f"accepted: {list(_OVERRIDABLE)}")
            self._check(self._apply(dataclasses.asdict(self), values), f"RPQConfig.overrides[{pattern!r}]")

    @staticmethod
    def _check(values: dict[str, Any], where: str) -> None:
        LayerSettings._check(values, where)
        if not isinstance(values["checkpoint"], bool):
            raise ValueError(f"{where}: checkpoint must be a bool, got {values['checkpoint']!r}")
        check_int(where, "seed", values["seed"], 0)

    @staticmethod
    def _apply(values: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        """``values`` with ``override`` on top; an override that names a split replaces the split."""
        values = dict(values)
        if any(name in override for name in SPLITS):
            values.update(dict.fromkeys(SPLITS))
        values.update(override)
        return values

    def with_settings(self, settings: dict[str, Any]) -> "RPQConfig":
        """A copy (checked) whose defaults have ``settings`` on top, as an override applies them: one that names
        a split replaces the split (``allocate``'s candidate sizes)."""
        return type(self)(**self._apply(self.to_dict(), settings))

    def settings_for(self, *names: str) -> LayerSettings | None:
        """Settings for the layer known by ``names`` (weight and layer name), or None to skip it."""
        values = dataclasses.asdict(self)
        for pattern, override in self.overrides.items():
            if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                values = self._apply(values, override)
        if values.get("skip"):
            return None
        return LayerSettings(**{name: values[name] for name in LAYER_SETTINGS})

    def unmatched(self, names: set[str]) -> list[str]:
        """The override patterns that match none of ``names`` (a typo, or a layer the model lacks)."""
        return [pattern for pattern in self.overrides if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready) that :meth:`from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RPQConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"RPQConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**values)

