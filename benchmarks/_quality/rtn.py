"""The usual alternative: round-to-nearest, per-output-channel, symmetric scalar quantization.

Fake-quantised: each chosen weight of a copy of the dense model is quantised to ``bits``-bit
integers (levels ``-(2^(bits-1)-1) .. 2^(bits-1)-1``, so int2 is -1, 0, 1), one fp32 scale per row
(``max |row| / (2^(bits-1)-1)``), then dequantised in place. Sizes are what it would store: ``bits``
per weight plus 32 bits of scale per row.
"""

import copy

import torch
from torch import nn


def quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` (rows first) quantised and dequantised, one symmetric scale per row."""
    rows = w.reshape(w.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) / qmax
    return (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)


def rtn(model: nn.Module, weights: dict[str, nn.Parameter], bits: int) -> nn.Module:
    """A copy of ``model`` whose parameters named in ``weights`` are fake-quantised to ``bits``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in weights:
            p = out.get_parameter(name)
            p.copy_(quantize_rows(p, bits))
    return out


def rtn_bits(weights: dict[str, nn.Parameter], bits: int) -> tuple[int, int]:
    """``(stored bits, dense bits)`` of ``weights`` at ``bits`` per weight plus an fp32 scale per row."""
    stored = sum(p.numel() * bits + p.shape[0] * 32 for p in weights.values())
    dense = sum(p.numel() * p.element_size() * 8 for p in weights.values())
    return stored, dense

