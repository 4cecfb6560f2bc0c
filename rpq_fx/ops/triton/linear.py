"""Triton kernels of the compressed-domain linear layer: ``y = x W^T`` and its backward, never writing W.

Two methods (design notes, section 1):

- ``"lut"`` (decode, a few rows): a table per codebook ``T[c, k, b] = codebooks[g(c), k] . x[b, slice c]``
  (:func:`_lut_table_kernel`), then ``y[b, n] = sum_c T[c, codes[c, n], b]`` (:func:`_lut_gather_kernel`); the
  backward scatters the output gradient by code (:func:`_lut_scatter_kernel`) and multiplies the
  result by the codebooks and the input (two small batched GEMMs).
- ``"fused"`` (more rows): a GEMM whose weight tile is gathered from the codebooks into registers
  / shared memory each step and fed to ``tl.dot``; its backward is the same GEMM for ``grad_x`` and
  ``grad^T x`` tiles added into the codewords for the codebooks' gradient. W and its gradient never
  reach global memory.

Accumulation is float32; float32 inputs multiply at full precision unless
``torch.backends.cuda.matmul.allow_tf32`` allows TF32, as for ``F.linear``. Shapes, dtypes and code
values are the caller's to check; the launchers take CUDA tensors, or CPU tensors under Triton's
interpreter.
"""

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .expand import _tile

__all__ = ["linear", "linear_backward", "lut_applies", "METHODS"]

METHODS = ("lut", "fused")
_LUT_MAX_BATCH = 16
# reason: untuned (no GPU here): tiles that tl.dot takes for every dtype (each side >= 16)
_BLOCK_B, _BLOCK_N, _BLOCK_COL = 32, 64, 32
_LUT_BLOCK_N, _LUT_BLOCK_K = 128, 64


def lut_applies(batch: int, codebook_dim: int) -> bool:
    """Whether the lookup-table method computes a batch: it gathers ``B*C*N`` table entries where the
    fused GEMM gathers ``N*C*d`` codebook values once per tile of rows, so it wins while ``B < d``
    (and the table stays small). Untimed on a GPU: benchmarks/gpu.py will confirm or replace it."""
    return batch <= min(_LUT_MAX_BATCH, codebook_dim)


def _precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision: float32 at full precision unless torch allows TF32 (Triton's default is
    TF32); None (the default) for float16 / bfloat16."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _upcast(x: Tensor) -> bool:
    # reason: Triton 3.8's interpreter computes tl.dot on bfloat16 wrongly (measured: errors of 1e10);
    # bfloat16 tiles are multiplied as float32 there, and as bfloat16 on a GPU
    return x.dtype == torch.bfloat16 and not x.is_cuda


# --------------------------------------------------------------------------- lookup tables

@triton.jit
def _lut_table_kernel(x_ptr, cb_ptr, table_ptr, B, K, d, row_len, SHARED: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr):
    """``table[c, k, b] = codebooks[g(c), k] . x[b, slice c]``; table ``[C, K, B]`` float32."""
    c = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    if SHARED:
        cb_base = cb_ptr
    else:
        cb_base = cb_ptr + c.to(tl.int64) * K * d
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for j0 in range(0, d, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        w = tl.load(cb_base + k.to(tl.int64)[:, None] * d + j[None, :], mask=(k < K)[:, None] & (j < d)[None, :],
                    other=0)  # [BLOCK_K, BLOCK_J]
        xs = tl.load(x_ptr + b.to(tl.int64)[None, :] * row_len + c * d + j[:, None],
                     mask=(j < d)[:, None] & (b < B)[None, :], other=0)  # [BLOCK_J, BLOCK_B]
        if UPCAST:
            w = w.to(tl.float32)
            xs = xs.to(tl.float32)
        acc += tl.dot(w, xs, input_precision=PRECISION)
    mask = (k < K)[:, None] & (b < B)[None, :]
    tl.store(table_ptr + (c * K + k).to(tl.int64)[:, None] * B + b[None, :], acc, mask=mask)


@triton.jit
def _lut_gather_kernel(table_ptr, codes_ptr, out_ptr, B, N, C, K, stride_cc, stride_cn, c_per,
                       BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """``out[s, b, n] = sum_{c in part s} table[c, codes[c, n], b]``; table ``[C, K, B]`` float32, the
    codebooks split into parts of ``c_per`` (axis 2 of the grid) so that a GEMV keeps the GPU busy."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    part = tl.program_id(2)
    mask = (n < N)[:, None] & (b < B)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for c in range(part * c_per, tl.minimum(part * c_per + c_per, C)):
        code = tl.load(codes_ptr + c * stride_cc + n.to(tl.int64) * stride_cn, mask=n < N, other=0)
        code = code.to(tl.int32) & 0xFFFF  # reason: int16 codes above 32767 are stored as negative bit patterns
        row = (c * K + code).to(tl.int64) * B
        valid = mask & (code < K)[:, None]
        acc += tl.load(table_ptr + row[:, None] + b[None, :], mask=valid, other=0.0)
    out = out_ptr + part.to(tl.int64) * B * N + b[None, :].to(tl.int64) * N + n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lut_scatter_kernel(grad_ptr, codes_ptr, out_ptr, B, N, K, stride_cc, stride_cn,
                        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """``out[c, codes[c, n], b] += grad[b, n]``; out ``[C, K, B]`` float32; one program per (tile of n, c)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1)
    code = tl.load(codes_ptr + c * stride_cc + n.to(tl.int64) * stride_cn, mask=n < N, other=0)
    code = code.to(tl.int32) & 0xFFFF  # reason: int16 codes above 32767 are stored as negative bit patterns
    row = (c * K + code).to(tl.int64) * B
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        mask = (n < N)[:, None] & (b < B)[None, :]
        grad = tl.load(grad_ptr + b[None, :].to(tl.int64) * N + n[:, None], mask=mask, other=0)
        tl.atomic_add(out_ptr + row[:, None] + b[None, :], grad.to(tl.float32), mask=mask & (code < K)[:, None])


def _lut_block_b(batch: int) -> int:
    # reason: at least 2 columns: a block of one is the one shape a 2-D tile of Triton might not lay out
    return min(max(2, triton.next_power_of_2(batch)), _LUT_MAX_BATCH)


@functools.cache
def _programs_on(device: torch.device) -> int:
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _programs(device: torch.device) -> int:
    """How many programs keep the device busy: 4 a streaming multiprocessor on CUDA (untuned); 8 elsewhere
    (the interpreter), so that the tests split the codebooks too."""
    return _programs_on(device) if device.type == "cuda" else 8


def _split(tiles: int, steps: int, device: torch.device) -> tuple[int, int]:
    """``(parts, steps per part)``: a reduction of ``steps`` blocks split so that ``tiles * parts`` programs
    keep the device busy (partial sums added after): a GEMV or a short GEMM has too few output tiles."""
    per_part = triton.cdiv(steps, max(1, min(steps, _programs(device) // tiles)))
    return triton.cdiv(steps, per_part), per_part


def _split_launch(kernel, grid: tuple[int, int], steps: int, block: int, inputs: tuple, out: Tensor, sizes: tuple,
                  **meta) -> None:
    """``kernel(*inputs, out, *sizes, span)`` over ``grid`` and the parts of its reduction of ``steps`` blocks of
    ``block`` (:func:`_split`; ``span`` a part's share), the partial sums added into ``out``."""
    parts, per_part = _split(grid[0] * grid[1], steps, out.device)
    sums = out if parts == 1 else out.new_empty(parts, *out.shape, dtype=torch.float32)
    kernel[(*grid, parts)](*inputs, sums, *sizes, per_part * block, **meta)
    if parts > 1:
        out.copy_(sums.sum(0))


def _per_slice(codebooks: Tensor, num_codebooks: int) -> Tensor:
    groups, num_codes, dim = codebooks.shape
    return codebooks.expand(num_codebooks, num_codes, dim) if groups == 1 else codebooks


def _lut_forward(x: Tensor, codebooks: Tensor, codes: Tensor, out: Tensor) -> None:
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    batch = x.shape[0]
    table = torch.empty(num_codebooks, num_codes, batch, device=x.device, dtype=torch.float32)
    grid = (num_codebooks, triton.cdiv(num_codes, _LUT_BLOCK_K), triton.cdiv(batch, _LUT_MAX_BATCH))
    _lut_table_kernel[grid](x, codebooks, table, batch, num_codes, dim, num_codebooks * dim, SHARED=groups == 1,
                            UPCAST=_upcast(x), PRECISION=_precision(x.dtype), BLOCK_K=_LUT_BLOCK_K,
                            BLOCK_B=_LUT_MAX_BATCH, BLOCK_J=min(64, max(16, triton.next_power_of_2(dim))))
    block_b = _lut_block_b(batch)
    grid = (triton.cdiv(out_features, _LUT_BLOCK_N), triton.cdiv(batch, block_b))
    _split_launch(_lut_gather_kernel, grid, num_codebooks, 1, (table, codes), out,
                  (batch, out_features, num_codebooks, num_codes, codes.stride(0), codes.stride(1)),
                  BLOCK_N=_LUT_BLOCK_N, BLOCK_B=block_b)


def _lut_backward(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, grad_x: Tensor | None,
                  need_codebooks: bool) -> Tensor | None:
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    batch = x.shape[0]
    scattered = torch.zeros(num_codebooks, num_codes, batch, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(out_features, _LUT_BLOCK_N), num_codebooks)
    _lut_scatter_kernel[grid](grad, codes, scattered, batch, out_features, num_codes, codes.stride(0),
                              codes.stride(1), BLOCK_N=_LUT_BLOCK_N, BLOCK_B=_lut_block_b(batch))
    if grad_x is not None:  # grad_x[b, c, :] = sum_k S[c, k, b] codebooks[g(c), k, :]
        cb = _per_slice(codebooks.float(), num_codebooks)
        grad_x.view(batch, num_codebooks, dim).copy_(torch.bmm(scattered.transpose(1, 2), cb).transpose(0, 1))
    if not need_codebooks:
        return None
    grad_cb = torch.bmm(scattered, x.float().view(batch, num_codebooks, dim).transpose(0, 1))  # [C, K, d]
    return (grad_cb.sum(0, keepdim=True) if groups == 1 else grad_cb).to(codebooks.dtype)


# --------------------------------------------------------------------------- fused: W tiles gathered, then tl.dot

@triton.jit
def _fused_forward_kernel(x_ptr, cb_ptr, codes_ptr, out_ptr, B, N, row_len, d, K, stride_cc, stride_cn, span,
                          SHARED: tl.constexpr, WHOLE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_COL: tl.constexpr):
    """``out[part, b, n] = sum_col x[b, col] W[n, col]`` over the part's ``span`` columns (axis 2 of the grid),
    W's tile gathered each step."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = tl.program_id(2)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for col0 in range(part * span, tl.minimum(part * span + span, row_len), BLOCK_COL):
        col = col0 + tl.arange(0, BLOCK_COL)
        offset, inside, valid = _tile(codes_ptr, codes_ptr, n, col0, N, row_len, d, K, stride_cc, stride_cn,
                                      SHARED, False, WHOLE, BLOCK_COL)
        w = tl.load(cb_ptr + offset, mask=valid, other=0)  # [BLOCK_N, BLOCK_COL]
        xs = tl.load(x_ptr + b.to(tl.int64)[:, None] * row_len + col[None, :],
                     mask=(b < B)[:, None] & (col < row_len)[None, :], other=0)
        if UPCAST:
            w = w.to(tl.float32)
            xs = xs.to(tl.float32)
        acc += tl.dot(xs, tl.trans(w), input_precision=PRECISION)
    mask = (b < B)[:, None] & (n < N)[None, :]
    out = out_ptr + part.to(tl.int64) * B * N + b.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_grad_input_kernel(grad_ptr, cb_ptr, codes_ptr, out_ptr, B, N, row_len, d, K, stride_cc, stride_cn, span,
                             SHARED: tl.constexpr, WHOLE: tl.constexpr, UPCAST: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_COL: tl.constexpr):
    """``out[part, b, col] = sum_n grad[b, n] W[n, col]`` over the part's ``span`` rows of W (axis 2 of the
    grid), W's tile gathered each step."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    col0 = tl.program_id(1) * BLOCK_COL
    col = col0 + tl.arange(0, BLOCK_COL)
    part = tl.program_id(2)
    acc = tl.zeros((BLOCK_B, BLOCK_COL), dtype=tl.float32)
    for n0 in range(part * span, tl.minimum(part * span + span, N), BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        offset, inside, valid = _tile(codes_ptr, codes_ptr, n, col0, N, row_len, d, K, stride_cc, stride_cn,
                                      SHARED, False, WHOLE, BLOCK_COL)
        w = tl.load(cb_ptr + offset, mask=valid, other=0)  # [BLOCK_N, BLOCK_COL]
        g = tl.load(grad_ptr + b.to(tl.int64)[:, None] * N + n[None, :], mask=(b < B)[:, None] & (n < N)[None, :],
                    other=0)
        if UPCAST:
            w = w.to(tl.float32)
            g = g.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)
    mask = (b < B)[:, None] & (col < row_len)[None, :]
    out = out_ptr + part.to(tl.int64) * B * row_len + b.to(tl.int64)[:, None] * row_len + col[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_grad_codebooks_kernel(grad_ptr, x_ptr, codes_ptr, out_ptr, B, N, row_len, d, K, stride_cc, stride_cn,
                                 SHARED: tl.constexpr, WHOLE: tl.constexpr, UPCAST: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_COL: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_COL]`` tile of ``grad^T x`` (the dense weight's gradient), added into the codewords
    it came from (out ``[G, K, d]`` float32); the tile never leaves the program."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_COL
    col = col0 + tl.arange(0, BLOCK_COL)
    acc = tl.zeros((BLOCK_N, BLOCK_COL), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        g = tl.load(grad_ptr + b.to(tl.int64)[None, :] * N + n[:, None], mask=(n < N)[:, None] & (b < B)[None, :],
                    other=0)  # [BLOCK_N, BLOCK_B]
        xs = tl.load(x_ptr + b.to(tl.int64)[:, None] * row_len + col[None, :],
                     mask=(b < B)[:, None] & (col < row_len)[None, :], other=0)  # [BLOCK_B, BLOCK_COL]
        if UPCAST:
            g = g.to(tl.float32)
            xs = xs.to(tl.float32)
        acc += tl.dot(g, xs, input_precision=PRECISION)
    offset, inside, valid = _tile(codes_ptr, codes_ptr, n, col0, N, row_len, d, K, stride_cc, stride_cn,
                                  SHARED, False, WHOLE, BLOCK_COL)
    tl.atomic_add(out_ptr + offset, acc, mask=valid)


def _fused_args(codebooks: Tensor, codes: Tensor, x: Tensor) -> tuple[tuple, dict]:
    groups, num_codes, dim = codebooks.shape
    args = (codes.shape[1], codes.shape[0] * dim, dim, num_codes, codes.stride(0), codes.stride(1))
    # reason: tl.dot takes no side under 16; a batch of up to 16 rows fills a block of 16, not half a block of 32
    block_b = 16 if x.shape[0] <= 16 else _BLOCK_B
    meta = dict(SHARED=groups == 1, WHOLE=dim % _BLOCK_COL == 0, UPCAST=_upcast(x), PRECISION=_precision(x.dtype),
                BLOCK_B=block_b, BLOCK_N=_BLOCK_N, BLOCK_COL=_BLOCK_COL)
    return args, meta


# --------------------------------------------------------------------------- launchers

def _method(method: str | None, batch: int, codebook_dim: int) -> str:
    if method is None:
        return "lut" if lut_applies(batch, codebook_dim) else "fused"
    if method not in METHODS:
        raise ValueError(f"rpq_fx triton linear: method must be one of {METHODS} or None, got {method!r}")
    return method


def linear(x: Tensor, codebooks: Tensor, codes: Tensor, method: str | None = None) -> Tensor:
    """``x [..., in] @ W^T`` ``[..., N]`` without W; ``method`` ``"lut"`` / ``"fused"``, or None: by
    :func:`lut_applies`. One dtype for ``x`` and the codebooks: float16, bfloat16 or float32."""
    out = x.new_empty(*x.shape[:-1], codes.shape[1])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    batch = x2.shape[0]
    if batch == 0 or out.numel() == 0:
        return out.zero_()
    codebooks = codebooks.contiguous()
    out2 = out.view(batch, codes.shape[1])
    if _method(method, batch, codebooks.shape[2]) == "lut":
        _lut_forward(x2, codebooks, codes, out2)
    else:
        args, meta = _fused_args(codebooks, codes, x2)
        grid = (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(codes.shape[1], _BLOCK_N))
        _split_launch(_fused_forward_kernel, grid, triton.cdiv(x2.shape[1], _BLOCK_COL), _BLOCK_COL,
                      (x2, codebooks, codes), out2, (batch, *args), **meta)
    return out


def linear_backward(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                    need_codebooks: bool, method: str | None = None) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_codebooks)`` of :func:`linear` (each empty unless asked for), as
    ``rpq_fx::_linear_compressed_backward``."""
    num_codebooks, out_features = codes.shape
    grad_x = x.new_empty(x.shape if need_input else (0,))
    grad_cb = codebooks.new_zeros(codebooks.shape if need_codebooks else (0,))
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    batch = x2.shape[0]
    if batch == 0 or not (need_input or need_codebooks) or out_features == 0 or x2.shape[1] == 0:
        return grad_x, grad_cb
    grad2 = grad.reshape(batch, out_features).contiguous()
    codebooks = codebooks.contiguous()
    gx2 = grad_x.view(batch, x2.shape[1]) if need_input else None
    if _method(method, batch, codebooks.shape[2]) == "lut":
        cb = _lut_backward(grad2, x2, codebooks, codes, gx2, need_codebooks)
        if need_codebooks:
            grad_cb.copy_(cb)
        return grad_x, grad_cb
    args, meta = _fused_args(codebooks, codes, x2)
    if need_input:
        grid = (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(x2.shape[1], _BLOCK_COL))
        _split_launch(_fused_grad_input_kernel, grid, triton.cdiv(out_features, _BLOCK_N), _BLOCK_N,
                      (grad2, codebooks, codes), gx2, (batch, *args), **meta)
    if need_codebooks:
        acc = grad_cb if grad_cb.dtype == torch.float32 else torch.zeros_like(grad_cb, dtype=torch.float32)
        grid = (triton.cdiv(out_features, _BLOCK_N), triton.cdiv(x2.shape[1], _BLOCK_COL))
        _fused_grad_codebooks_kernel[grid](grad2, x2, codes, acc, batch, *args, **meta)
        if acc is not grad_cb:
            grad_cb.copy_(acc)
    return grad_x, grad_cb
