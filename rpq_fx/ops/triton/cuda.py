"""The CUDA implementations of the rpq_fx ops: the same checks as the stock kernels, then a Triton
kernel where Triton can compute (:mod:`rpq_fx._triton`) and the dtype is one it takes, else the
stock kernel (:mod:`rpq_fx.ops.stock`). :mod:`rpq_fx.ops.triton` registers them for ``CUDA``.

They are plain functions of tensors, so the tests call them on CPU tensors too, with the kernels
under Triton's interpreter. The kernel modules are imported on the first call, so that
``import rpq_fx`` never imports Triton.
"""

import contextlib
import importlib
from types import ModuleType

import torch
from torch import Tensor

from ... import _triton
from .. import stock
from ..checks import check_codes, check_embedding, check_expand, check_indices

__all__ = ["expand", "expand_backward_add", "linear_compressed", "linear_compressed_backward", "embedding"]

_EXPAND_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def _on(tensor: Tensor) -> contextlib.AbstractContextManager:
    # reason: Triton launches on the current CUDA device, and the dispatcher sets no device guard for a
    # Python kernel: a call on tensors of another GPU switches to theirs
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _linear_applies(x: Tensor, codebooks: Tensor) -> bool:
    return _triton.serving() and x.dtype in _LINEAR_DTYPES and codebooks.dtype == x.dtype


def expand(codebooks: Tensor, codes: Tensor) -> Tensor:
    """``rpq_fx::expand``."""
    check_expand(codebooks, codes)
    if not (_triton.serving() and codebooks.dtype in _EXPAND_DTYPES):
        return stock.expand(codebooks, codes)
    check_codes(codes, codebooks.shape[1], "rpq_fx expand")
    with _on(codes):
        return _kernels("expand").expand_rows(codebooks, codes)


def _order_free() -> bool:
    # reason: the Triton scatters add with float32 atomics in no fixed order; under
    # torch.use_deterministic_algorithms(True) the stock kernels (torch's index_add_) compute instead
    return not torch.are_deterministic_algorithms_enabled()


def expand_backward_add(out: Tensor, grad: Tensor, codes: Tensor) -> None:
    """``rpq_fx::_expand_backward_add`` (float32 atomics: the order of the sums is not fixed)."""
    if not (_triton.serving() and out.dtype in _EXPAND_DTYPES and grad.dtype == out.dtype and _order_free()):
        return stock.expand_backward_add(out, grad, codes)
    check_codes(codes, out.shape[1], "rpq_fx expand_backward")
    with _on(codes):
        _kernels("expand").scatter_rows(out, grad, codes)


def linear_compressed(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None = None) -> Tensor:
    """``rpq_fx::_linear_compressed``: lookup tables for a few rows, a fused GEMM above; the bias added after."""
    if not _linear_applies(x, codebooks):
        out = stock.linear_compressed(x, codebooks, codes)
    else:
        check_codes(codes, codebooks.shape[1], "rpq_fx linear")
        with _on(codes):
            out = _kernels("linear").linear(x, codebooks, codes)
    return out if bias is None else out.add_(bias)


def linear_compressed_backward(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                               need_codebooks: bool) -> tuple[Tensor, Tensor]:
    """``rpq_fx::_linear_compressed_backward`` (float32 atomics: the order of the sums is not fixed)."""
    if not (_linear_applies(x, codebooks) and _order_free()):
        return stock.linear_compressed_backward(grad, x, codebooks, codes, need_input, need_codebooks)
    check_codes(codes, codebooks.shape[1], "rpq_fx linear_backward")
    with _on(codes):
        return _kernels("linear").linear_backward(grad, x, codebooks, codes, need_input, need_codebooks)


def embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, padding_idx: int | None = None,
              scale_grad_by_freq: bool = False) -> Tensor:
    """``rpq_fx::embedding``: only the looked-up rows are built, by one kernel."""
    check_embedding(indices, codebooks, codes, padding_idx)
    if not (_triton.serving() and codebooks.dtype in _EXPAND_DTYPES):
        rows = codes.index_select(1, _checked(indices, codes))
        return stock.expand(codebooks, rows).view(*indices.shape, -1)
    flat = _checked(indices, codes)
    # reason: only the looked-up rows' codes are checked, as the stock kernel does (their copy is C*M bytes)
    check_codes(codes.index_select(1, flat), codebooks.shape[1], "rpq_fx embedding")
    with _on(codes):
        return _kernels("expand").expand_rows(codebooks, codes, flat).view(*indices.shape, -1)


def _checked(indices: Tensor, codes: Tensor) -> Tensor:
    check_indices(indices, codes.shape[1])
    return indices.reshape(-1).long()
