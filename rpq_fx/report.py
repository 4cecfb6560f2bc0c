"""What a conversion did: ``model_size`` and the per-layer ``report``."""

import math
from dataclasses import dataclass

from tabulate import tabulate
from torch import nn

from . import _kernels, _triton
from .config import LayerSettings
from .nn.weight import rpq_weights
from .passes import LayerPlan
from .record import FitOutcome, conversion_record

__all__ = ["model_size", "report", "Report"]

_MIB = 1024**2


def _bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def model_size(model: nn.Module) -> float:
    """MiB held in parameters plus buffers (each shared tensor once), as ``rpq.utils.model_size``."""
    return _bytes(model) / _MIB


def _layers(model: nn.Module) -> tuple[list[LayerPlan], dict[str, FitOutcome]]:
    """The conversion record's layers and fits, or layers read off the RPQ weights of an eagerly built
    model (filled at random, as RPQ layers are built)."""
    record = conversion_record(model)
    if record is not None:
        return list(record.layers), record.fits
    layers = {}
    for name, w in rpq_weights(model):
        hot = {} if w.hot is None else {"hot_rows": w.hot.num_vectors, "hot_codebook_dim": w.hot.codebook_dim}
        settings = LayerSettings(num_codebooks=w.num_codebooks, num_codes=w.num_codes,
                                 shared_codebooks=w.shared_codebooks, codebook_dtype=w.codebooks.dtype,
                                 additive_codebooks=w.additive_codebooks, **hot)
        layers[id(w)] = LayerPlan(name, (name,), (), w.shape, w.dtype, settings, w.num_codebooks, w.codebook_dim)
    return list(layers.values()), {layer.name: FitOutcome("random") for layer in layers.values()}


def _note(layer: LayerPlan) -> str:
    notes = [f"hot: {layer.hot_rows} rows, d={layer.settings.hot_codebook_dim}"] if layer.hot_rows else []
    notes += [f"additive: {layer.settings.additive_codebooks} codebooks"] if layer.converted and (
        layer.settings.additive_codebooks > 1) else []
    notes += [f"tied: {', '.join(layer.aliases)}"] if len(layer.aliases) > 1 else []
    return "; ".join(notes)


@dataclass
class Report:
    """Per-layer rows and totals; ``str()`` is a table, :meth:`to_markdown` and :meth:`to_dict` for files."""

    rows: list[dict]
    totals: dict

    def _table(self, fmt: str) -> str:
        t = self.totals
        bits = f" at {t['bits_per_weight']:.2f} bits per weight" if t["bits_per_weight"] is not None else ""
        summary = (f"{t['converted']} of {t['layers']} weights converted{bits}; model {t['bytes_before'] / _MIB:.3f} MiB "
                   f"-> {t['bytes_after'] / _MIB:.3f} MiB ({t['ratio']:.2f}x smaller)"
                   + (f"; captured by {t['path']}" if t["path"] else "")
                   + f"\ncompute on CUDA: {t['cuda_kernels']}\ncompute: {t['kernels']}")
        floatfmt = [".4f" if key == "fit err" else ".2f" for key in (self.rows[0] if self.rows else ())]
        return tabulate(self.rows, headers="keys", tablefmt=fmt, floatfmt=floatfmt or ".2f") + "\n\n" + summary

    def __str__(self) -> str:
        return self._table("simple")

    def to_markdown(self) -> str:
        return self._table("github")

    def to_dict(self) -> dict:
        return {"rows": self.rows, "totals": self.totals}


def report(model: nn.Module) -> Report:
    """Each weight: name, op, dense shape, C, K, d, codebook dtype, bytes before and after, ratio,
    stored bits per weight, how it was filled (and the fit's relative error), or why it stayed dense.
    Totals: bytes before and after, the ratio, the stored bits per converted weight, and which kernels
    compute on the CPU (the C++ kernels, or stock torch ops and why) and on CUDA tensors (the Triton
    kernels, or stock torch ops and why)."""
    rows = []
    layers, fits = _layers(model)
    for layer in layers:
        ratio = layer.bytes_before / layer.bytes_after
        fit = fits.get(layer.name) if layer.converted else None
        rows.append({
            "layer": layer.name, "op": ",".join(layer.ops), "shape": "x".join(map(str, layer.shape)),
            "C": layer.num_codebooks, "K": layer.settings.num_codes if layer.converted else None,
            "d": layer.codebook_dim,
            "codebooks": str(layer.codebook_dtype).removeprefix("torch.") if layer.converted else None,
            "bytes before": layer.bytes_before, "bytes after": layer.bytes_after, "ratio": ratio,
            "bits/w": layer.bits_per_weight, "init": fit.filled if fit else None,
            "fit err": fit.error if fit else None,
            "note": layer.reason or _note(layer),
        })
    after = _bytes(model)
    before = after + sum(r["bytes before"] - r["bytes after"] for r in rows)
    converted = [layer for layer in layers if layer.converted]
    values = sum(math.prod(layer.shape) for layer in converted)
    totals = {"layers": len(rows), "converted": len(converted),
              "bytes_before": before, "bytes_after": after, "ratio": before / after if after else 1.0,
              "bits_per_weight": 8 * sum(layer.bytes_after for layer in converted) / values if values else None,
              "path": record.path if (record := conversion_record(model)) else None, "kernels": _kernels.status(),
              "cuda_kernels": _triton.status()}
    return Report(rows, totals)
