"""Triton kernels that build rows of the weight from codes, and scatter a weight-shaped gradient back.

``W[n, c*d + j] = codebooks[g(c), codes[c, n], j]`` (``g(c) = 0`` with one shared codebook). Each
program computes a ``[BLOCK_N, BLOCK_COL]`` tile; a column maps to its slice ``c = col // d`` and
position ``j = col % d``, so any codebook dim (1 and up, odd too) takes the same code. Codes are
uint8 or int16 (bit patterns read unsigned); a code at or above ``K`` reads nothing (masked), so no
input reads outside the codebooks even where the caller's check was skipped.

The launchers take tensors on any device: CUDA, or the CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` when this module is imported), which the tests use.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["expand_rows", "scatter_rows"]

_BLOCK_N, _BLOCK_COL = 32, 128  # reason: untuned (no GPU here); 4K elements a program, coalesced along columns


@triton.jit
def _tile(codes_ptr, rows_ptr, n, col0, num_rows, row_len, d, K, stride_cc, stride_cn, SHARED: tl.constexpr,
          HAS_ROWS: tl.constexpr, WHOLE: tl.constexpr, BLOCK_COL: tl.constexpr):
    """For the tile of rows ``n`` and columns ``col0 + arange(BLOCK_COL)``: the flat codebook offset of each
    ``(n, col)`` and the masks ``inside`` (in the output) and ``valid`` (inside, with a code below ``K``).
    ``WHOLE``: ``d`` is a multiple of ``BLOCK_COL``, so the tile lies in one slice: one code per row, and
    each row's values are contiguous in its codeword."""
    col = col0 + tl.arange(0, BLOCK_COL)
    inside = (n < num_rows)[:, None] & (col < row_len)[None, :]
    row = n.to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + n, mask=n < num_rows, other=0).to(tl.int64)
    if WHOLE:
        c = col0 // d
        code = tl.load(codes_ptr + c * stride_cc + row * stride_cn, mask=n < num_rows, other=0)
        code = code.to(tl.int32) & 0xFFFF  # reason: int16 codes above 32767 are stored as negative bit patterns
        valid = inside & (code < K)[:, None]
        if SHARED:
            flat = code
        else:
            flat = c * K + code
        offset = flat.to(tl.int64)[:, None] * d + (col - c * d)[None, :]
    else:
        c = col // d
        code = tl.load(codes_ptr + c[None, :].to(tl.int64) * stride_cc + row[:, None] * stride_cn, mask=inside,
                       other=0)
        code = code.to(tl.int32) & 0xFFFF  # reason: int16 codes above 32767 are stored as negative bit patterns
        valid = inside & (code < K)
        if SHARED:
            flat = code
        else:
            flat = c[None, :] * K + code
        offset = flat.to(tl.int64) * d + (col - c * d)[None, :]
    return offset, inside, valid


@triton.jit
def _expand_kernel(cb_ptr, codes_ptr, rows_ptr, out_ptr, num_rows, row_len, d, K, stride_cc, stride_cn,
                   SHARED: tl.constexpr, HAS_ROWS: tl.constexpr, WHOLE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_COL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_COL
    col = col0 + tl.arange(0, BLOCK_COL)
    offset, inside, valid = _tile(codes_ptr, rows_ptr, n, col0, num_rows, row_len, d, K, stride_cc, stride_cn,
                                  SHARED, HAS_ROWS, WHOLE, BLOCK_COL)
    value = tl.load(cb_ptr + offset, mask=valid, other=0)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * row_len + col[None, :], value, mask=inside)


@triton.jit
def _scatter_kernel(grad_ptr, codes_ptr, out_ptr, num_rows, row_len, d, K, stride_cc, stride_cn,
                    SHARED: tl.constexpr, WHOLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_COL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_COL
    col = col0 + tl.arange(0, BLOCK_COL)
    offset, inside, valid = _tile(codes_ptr, codes_ptr, n, col0, num_rows, row_len, d, K, stride_cc, stride_cn,
                                  SHARED, False, WHOLE, BLOCK_COL)
    grad = tl.load(grad_ptr + n.to(tl.int64)[:, None] * row_len + col[None, :], mask=inside, other=0)
    tl.atomic_add(out_ptr + offset, grad.to(tl.float32), mask=valid)


def _grid(num_rows: int, row_len: int) -> tuple[int, int]:
    return triton.cdiv(num_rows, _BLOCK_N), triton.cdiv(row_len, _BLOCK_COL)


def expand_rows(codebooks: Tensor, codes: Tensor, rows: Tensor | None = None) -> Tensor:
    """``expand(codebooks, codes)`` ``[N, C*d]``, or only the rows ``rows`` (int64 ``[M]``, each < N) ``[M, C*d]``.

    Shapes and code values are the caller's to check (:mod:`rpq_fx.ops.checks`)."""
    groups, num_codes, dim = codebooks.shape
    row_len = codes.shape[0] * dim
    num_rows = codes.shape[1] if rows is None else rows.numel()
    out = codebooks.new_empty(num_rows, row_len)
    if out.numel():
        _expand_kernel[_grid(num_rows, row_len)](
            codebooks.contiguous(), codes, codes if rows is None else rows, out, num_rows, row_len, dim, num_codes,
            codes.stride(0), codes.stride(1), SHARED=groups == 1, HAS_ROWS=rows is not None,
            WHOLE=dim % _BLOCK_COL == 0, BLOCK_N=_BLOCK_N, BLOCK_COL=_BLOCK_COL)
    return out


def scatter_rows(out: Tensor, grad: Tensor, codes: Tensor) -> None:
    """``out [G, K, d] += expand_backward(grad [N, C*d], codes [C, N])``: each slice's gradient added into
    its codeword (float32 atomics, so the order of the sums is not fixed)."""
    num_groups, num_codes, dim = out.shape
    num_rows, row_len = grad.shape
    if grad.numel() == 0:
        return
    acc = out if out.dtype == torch.float32 and out.is_contiguous() else out.new_zeros(out.shape, dtype=torch.float32)
    _scatter_kernel[_grid(num_rows, row_len)](
        grad.contiguous(), codes, acc, num_rows, row_len, dim, num_codes, codes.stride(0), codes.stride(1),
        SHARED=num_groups == 1, WHOLE=dim % _BLOCK_COL == 0, BLOCK_N=_BLOCK_N, BLOCK_COL=_BLOCK_COL)
    if acc is not out:
        out.add_(acc.to(out.dtype))
