"""What a quantized model really stores: every tensor it keeps, counted from the tensors' own bytes.

Quantization libraries keep a weight as a tensor subclass whose data lives in inner tensors
(torchao's ``qdata`` / ``scale`` / ``zero_point``, quanto's packed ``_data`` / ``_scale`` /
``_shift``) or, as HQQ does, in a plain dict beside the module. Counting ``nbytes`` of those inner
tensors gives the size as stored (unpacked int4 in int8 counts 8 bits), not the nominal bit width.
"""

import torch
from torch import nn

PLAIN = (torch.Tensor, nn.Parameter)


def _leaves(t: torch.Tensor):
    """The plain tensors that hold ``t``'s data (itself when it is not a wrapper subclass)."""
    if type(t) not in PLAIN and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _dict_tensors(value):
    """Tensors anywhere inside nested dicts / lists (HQQ's ``meta`` holds its scales and zeros)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _dict_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _dict_tensors(v)


def module_tensors(module: nn.Module):
    """Every tensor ``module`` keeps itself: parameters, buffers, and tensors in a ``meta`` dict."""
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    # reason: hqq.core.quantize.HQQLinear keeps scale / zero in ``self.meta``, neither parameter nor buffer
    yield from _dict_tensors(getattr(module, "meta", None))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor ``model`` stores, each storage counted once (tied weights, views)."""
    seen, total = set(), 0
    for module in model.modules():
        for tensor in module_tensors(module):
            for leaf in _leaves(tensor):
                if leaf.device.type == "meta":
                    continue
                storage = leaf.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total


def stored_bits_per_weight(dense: nn.Module, quantized: nn.Module, weights: dict[str, torch.Tensor]) -> float:
    """Stored bits per weight of ``weights`` in ``quantized``: whatever the model's size changed by is
    theirs (scales, zeros, packed or unpacked codes, extra buffers a library adds), so a weight left
    dense counts its 32 bits and a library's bookkeeping counts too."""
    numel = sum(w.numel() for w in weights.values())
    dense_weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    weight_bytes = model_bytes(quantized) - (model_bytes(dense) - dense_weight_bytes)
    return 8 * weight_bytes / numel


def covered(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """The names in ``weights`` whose layer in ``model`` no longer holds a plain floating-point weight."""
    model = getattr(model, "wrapped", model)  # methods.NoGrad
    out = []
    for name in weights:
        path = name.rpartition(".")[0]
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue
        w = layer._parameters.get("weight", layer._buffers.get("weight"))
        if not (type(w) in PLAIN and w.is_floating_point()):
            out.append(name)
    return out
