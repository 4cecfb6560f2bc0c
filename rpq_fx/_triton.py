"""Whether Triton kernels compute rpq_fx's ops on CUDA tensors (:mod:`rpq_fx.ops.triton`), and why not.

The kernels are registered with the dispatcher for ``CUDA`` when :mod:`rpq_fx.ops` is imported; each
call asks :func:`serving` and computes with stock torch ops where Triton cannot be imported, or with
``RPQ_FX_KERNELS=torch`` (which turns the C++ CPU kernels off too). Triton is imported on the first
question, never by ``import rpq_fx`` (a CPU-only user never pays for it). :func:`status` is the
line ``report`` prints.
"""

import os
import threading

import torch

__all__ = ["serving", "status", "unavailable_reason"]

_lock = threading.Lock()
_state: dict[str, object] = {}
_MIN_VERSION = (3, 0)  # reason: the kernels use tl.dot's input_precision and 3.x's interpreter


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _probe() -> str | None:
    """None where Triton can compute, else why not (once per process)."""
    if os.environ.get("RPQ_FX_KERNELS", "").lower() == "torch":
        return "turned off by RPQ_FX_KERNELS=torch"
    try:
        import triton
    except Exception as error:  # reason: any import failure (missing, broken install) means: use stock ops
        return f"triton cannot be imported ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if _version(triton.__version__) < _MIN_VERSION:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, _MIN_VERSION))}"
    _state["version"] = triton.__version__
    return None


def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot compute (None where they can)."""
    if "reason" not in _state:
        with _lock:
            if "reason" not in _state:
                _state["reason"] = _probe()
    return _state["reason"]


def serving() -> bool:
    """Whether CUDA calls reach the Triton kernels."""
    return unavailable_reason() is None


def status() -> str:
    """One line for a report: what computes the ops on CUDA tensors, or why stock torch ops do."""
    reason = unavailable_reason()
    if reason is not None:
        return f"stock torch ops (Triton kernels not available: {reason})"
    where = "" if torch.cuda.is_available() else " (no CUDA device here)"
    return f"Triton {_state['version']} kernels{where}"
