"""``decompress``: the dense weights an RPQ model computes with, under their original names."""

import torch
from torch import nn

from .nn.weight import rpq_weights
from .record import conversion_record

__all__ = ["decompress"]


@torch.no_grad()
def decompress(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map every RPQ weight's original parameter name (each name of a tied weight) to its dense value.

    ``original.load_state_dict(decompress(converted), strict=False)`` gives the dense model that
    computes what the converted one does: the independent reference the tests compare against.
    """
    dense: dict[int, torch.Tensor] = {}
    out = {}
    for name, module in rpq_weights(model, remove_duplicate=False):
        out[name] = dense.setdefault(id(module), module())
    record = conversion_record(model)
    for layer in record.layers if record else ():
        present = [alias for alias in layer.aliases if alias in out] if layer.converted else []
        out.update(dict.fromkeys(layer.aliases, out[present[0]]) if present else {})
    return out
