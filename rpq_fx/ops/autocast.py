"""Autocast (automatic mixed precision) rules of the rpq_fx ops, registered through ``torch.library``.

Under ``torch.autocast(device, dtype)`` each op casts as its dense counterpart would:

- ``"lower"`` (``rpq_fx::linear`` and its kernels, as ``F.linear`` / ``mm`` / ``bmm``; ``rpq_fx::conv``, as
  ``F.conv2d``): every
  floating-point input on that device that is not float64 (input, codebooks, bias, grad) is cast
  to the autocast dtype, then the op runs with autocast off. The codebooks are cast, not the
  dense weight: ``C*K*d`` values, and the weight is never built in float32.
- ``"keep"`` (``expand``, ``embedding``, the backward ops, ``_nearest``): nothing is cast and the op
  runs in its inputs' dtypes with autocast off, as ``F.embedding`` (not on autocast's lists) and a
  weight read by a consumer op: the consumer (``F.linear``, ``F.conv2d``) casts the expanded weight.

torch's own ``torch.library.register_autocast`` casts to one dtype fixed at registration, where
autocast's dtype is the caller's choice (``bfloat16`` or ``float16``); these rules read it per call
(:func:`torch.get_autocast_dtype`). The gradients of the casts (``Tensor.to``) return each
gradient in its parameter's dtype.
"""

import torch

__all__ = ["AUTOCAST_RULES", "AUTOCAST_KEYS"]

# op name (namespace rpq_fx) -> rule; every op of the namespace has one (tests/test_ops_autocast.py checks)
AUTOCAST_RULES = {
    "linear": "lower", "linear_backward": "lower", "_linear_compressed": "lower",
    "_linear_compressed_backward": "lower", "_linear_lut": "lower", "conv": "lower",
    "expand": "keep", "expand_backward": "keep", "_expand_backward_add": "keep", "embedding": "keep",
    "_nearest": "keep",
}
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # device type -> dispatch key

_lib = torch.library.Library("rpq_fx", "IMPL")


def _lowered(value, device_type: str, dtype: torch.dtype):
    """``value`` cast to ``dtype`` where autocast would cast it: a floating tensor on ``device_type``, not float64."""
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == device_type
            and value.dtype != torch.float64):
        return value.to(dtype)
    return value


def _rule(op, device_type: str, lower: bool):
    def kernel(_keyset, *args, **kwargs):
        if lower:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(_lowered(a, device_type, dtype) for a in args)
        # reason: autocast off excludes this dispatch key, so the call below reaches the op's own kernels
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return kernel


def _register() -> None:
    for name, rule in AUTOCAST_RULES.items():
        if not hasattr(torch.ops.rpq_fx, name):  # reason: _nearest exists only where the C++ kernels loaded
            continue
        op = getattr(torch.ops.rpq_fx, name).default
        for device_type, key in AUTOCAST_KEYS.items():
            _lib.impl(name, _rule(op, device_type, rule == "lower"), key, with_keyset=True)


_register()
