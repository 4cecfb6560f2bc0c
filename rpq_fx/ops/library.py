"""The rpq_fx ops: schemas, fake kernels and autograd formulas, in one place.

``rpq_fx::expand(codebooks, codes) -> W`` and the compressed-domain ``rpq_fx::linear`` and
``rpq_fx::embedding`` that compute without building ``W``. Each is a ``torch.library`` custom op,
so that a rewritten graph shows it as a single named node, and so that it runs under
``torch.compile``, ``torch.export`` and on the meta device.

Semantics: ``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]`` with ``g(c) = c`` for one codebook
per slice and ``g(c) = 0`` when a single codebook is shared by all slices.

Device kernels: each op's default implementation is :mod:`.stock` (stock torch ops, any device);
the C++ CPU kernels register themselves with the dispatcher for ``CPU`` (``TORCH_LIBRARY_IMPL`` in
``csrc/rpq_kernels.cpp``) and are loaded at the end of this module, so ``torch.ops.rpq_fx.*``
reaches them by device with no Python branch. The kernel-level ops (``_expand_backward_add``,
``_linear_compressed``, ``_linear_compressed_backward``) have no autograd of their own: the ops
above differentiate them. A CUDA or Triton kernel registers beside them the same way.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import _kernels
from . import stock
from .checks import (check_codes, check_devices, check_embedding, check_expand, check_expand_backward, check_indices,
                     check_linear, check_linear_backward, _require)
from .policy import LUT_BITS, choose_path, forced_path

__all__ = ["expand", "expand_backward", "linear", "linear_backward", "embedding", "hot_embedding", "stock_ops"]

_EXPAND_BLOCK_BYTES = 8 * 2**20  # weight rows expanded at a time on the expand path (see _row_blocks)

# --------------------------------------------------------------------------- kernel-level ops (no autograd)

_lib = torch.library.Library("rpq_fx", "FRAGMENT")
_lib.define("_expand_backward_add(Tensor(a!) out, Tensor grad, Tensor codes) -> ()")
_lib.define("_linear_compressed(Tensor x, Tensor codebooks, Tensor codes, Tensor? bias=None) -> Tensor")
_lib.define("_linear_compressed_backward(Tensor grad, Tensor x, Tensor codebooks, Tensor codes, bool need_input, "
            "bool need_codebooks) -> (Tensor, Tensor)")


def _linear_compressed_stock(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W^T + bias`` by the stock ops: the product, then the bias added in place (the C++ kernel adds it in its
    output's write, with the same roundings)."""
    out = stock.linear_compressed(x, codebooks, codes)
    return out if bias is None else out.add_(bias)


_STOCK = {"_expand_backward_add": stock.expand_backward_add, "_linear_compressed": _linear_compressed_stock,
          "_linear_compressed_backward": stock.linear_compressed_backward}
for _name, _kernel in _STOCK.items():
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")


# --------------------------------------------------------------------------- expand

def _expand_stock(codebooks: Tensor, codes: Tensor) -> Tensor:
    check_expand(codebooks, codes)
    return stock.expand(codebooks, codes)


@torch.library.custom_op("rpq_fx::expand", mutates_args=())
def expand(codebooks: Tensor, codes: Tensor) -> Tensor:
    """Expand ``codebooks [G, K, d]`` and ``codes [C, N]`` into the dense weight ``[N, C*d]``."""
    return _expand_stock(codebooks, codes)


@expand.register_fake
def _(codebooks: Tensor, codes: Tensor) -> Tensor:
    check_expand(codebooks, codes)
    return codebooks.new_empty(codes.shape[1], codes.shape[0] * codebooks.shape[2])


@torch.library.custom_op("rpq_fx::expand_backward", mutates_args=())
def expand_backward(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    """Gradient of :func:`expand` w.r.t. the codebooks: each weight slice's gradient summed into its codeword."""
    check_expand_backward(grad, codes, num_groups, num_codes)
    out = grad.new_zeros(num_groups, num_codes, grad.shape[1] // codes.shape[0])
    torch.ops.rpq_fx._expand_backward_add(out, grad, codes)
    return out


@expand_backward.register_fake
def _(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    check_expand_backward(grad, codes, num_groups, num_codes)
    return grad.new_empty(num_groups, num_codes, grad.shape[1] // codes.shape[0])


def _setup_context(ctx, inputs, output):
    codebooks, codes = inputs
    ctx.save_for_backward(codes)
    ctx.num_groups, ctx.num_codes = codebooks.shape[0], codebooks.shape[1]


def _backward(ctx, grad):
    (codes,) = ctx.saved_tensors
    return expand_backward(grad.contiguous(), codes, ctx.num_groups, ctx.num_codes), None


expand.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    _, codes, _, _ = inputs
    ctx.save_for_backward(codes)


def _double_backward(ctx, grad_codebooks):
    (codes,) = ctx.saved_tensors
    return expand(grad_codebooks.contiguous(), codes), None, None, None


expand_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)


# =====================================================================================================
# Compressed-domain ops: a linear layer and an embedding lookup that never build the dense weight.
#
# Linear, per codebook c (design notes, section 1):
#   T[c, k, b] = codebooks[g(c), k] . x[b, c-th slice]      B*K*in multiply-adds (a bmm)
#   y[b, n]    = sum_c T[c, codes[c, n], b]                  B*C*N adds (a gather)
# against B*in*N for the dense product. The backward has the same shape: scatter the output
# gradient by code (S[c, k, b] = sum of grad[b, n] over the n with codes[c, n] = k), then two small
# bmms against the codebooks and the input. Each call picks the cheaper of this and
# expand-then-F.linear (:func:`choose_path`); neither path keeps the dense weight for backward.
# =====================================================================================================

def _row_blocks(out_features: int, in_features: int, itemsize: int) -> list[slice]:
    """Rows of the weight expanded at a time on the expand path: about 8 MiB of weight per block.

    The whole weight never exists at once, and a block small enough to be recycled by the allocator
    costs no page faults (a fresh 64 MiB weight does: most of an expansion's time on the CPU).
    """
    rows = max(64, _EXPAND_BLOCK_BYTES // max(1, in_features * itemsize) // 64 * 64)
    return [slice(n, min(n + rows, out_features)) for n in range(0, out_features, rows)]


def _expand_forward(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """``out = x W^T + bias``, the weight expanded a block of rows at a time."""
    for rows in _row_blocks(codes.shape[1], x.shape[1], x.element_size()):
        weight = expand(codebooks, codes[:, rows])
        if bias is None:
            torch.mm(x, weight.t(), out=out[:, rows])
        else:
            torch.addmm(bias[rows], x, weight.t(), out=out[:, rows])


def _expand_backward_2d(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                        need_codebooks: bool, grad_x: Tensor) -> Tensor | None:
    """The expand path's backward, a block of weight rows at a time: ``grad_x = grad W`` (the weight rebuilt
    here, never kept from the forward) and the codebooks' gradient from ``grad^T x``, one block of it at a time."""
    grad_cb = codebooks.new_zeros(codebooks.shape) if need_codebooks else None
    for i, rows in enumerate(_row_blocks(codes.shape[1], x.shape[1], x.element_size())):
        block_codes = codes[:, rows]
        if need_input:
            weight = expand(codebooks, block_codes)
            if i == 0:
                torch.mm(grad[:, rows], weight, out=grad_x)
            else:
                grad_x.addmm_(grad[:, rows], weight)
        if need_codebooks:
            torch.ops.rpq_fx._expand_backward_add(grad_cb, grad[:, rows].t() @ x, block_codes)
    return grad_cb


@torch.library.custom_op("rpq_fx::linear", mutates_args=())
def linear(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None = None, path: str = "auto") -> Tensor:
    """``F.linear(input, expand(codebooks, codes), bias)``, choosing per call how to compute it.

    ``path="compressed"`` never builds the weight; ``"expand"`` builds it and calls ``F.linear``;
    ``"auto"`` picks the cheaper by :func:`choose_path`, unless :func:`compute_path` or ``RPQ_FX_PATH`` force one.
    ``"lut8"`` / ``"lut16"`` (opt-in, approximate): the compressed forward through 8- / 16-bit lookup tables
    (:mod:`.policy`).
    """
    check_linear(input, codebooks, codes, bias)
    out_features = codes.shape[1]
    rows = input.shape[:-1].numel()
    chosen = choose_path(input, codebooks, codes, path) if rows > 0 else "expand"
    if chosen == "compressed":
        return torch.ops.rpq_fx._linear_compressed(input, codebooks, codes, bias)  # the bias added in its write
    if chosen in LUT_BITS:
        out = torch.ops.rpq_fx._linear_lut(input, codebooks, codes, LUT_BITS[chosen])
        return out if bias is None else out.add_(bias)
    # reason: written through a 2-D view into a fresh tensor: an op's output must not be a view (callers
    # modify it in place)
    out = input.new_empty(*input.shape[:-1], out_features)
    if rows > 0:
        _expand_forward(input.reshape(-1, input.shape[-1]), codebooks, codes, bias, out.view(-1, out_features))
    return out


@linear.register_fake
def _(input, codebooks, codes, bias=None, path="auto"):
    check_linear(input, codebooks, codes, bias)
    return input.new_empty(*input.shape[:-1], codes.shape[1])


@torch.library.custom_op("rpq_fx::linear_backward", mutates_args=())
def linear_backward(grad: Tensor, input: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                    need_codebooks: bool, path: str = "auto") -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_codebooks)`` of :func:`linear` (bias aside); an output not asked for is empty."""
    check_linear_backward(grad, input, codebooks, codes)
    in_features = input.shape[-1]
    g = grad.reshape(-1, codes.shape[1])
    x = input.reshape(-1, in_features)
    if g.shape[0] > 0 and choose_path(input, codebooks, codes, path, backward=True) == "compressed":
        return torch.ops.rpq_fx._linear_compressed_backward(grad, input, codebooks, codes, need_input, need_codebooks)
    grad_x = input.new_empty(input.shape if need_input else (0,))
    if g.shape[0] == 0:
        grad_x.zero_()
        grad_cb = codebooks.new_zeros(codebooks.shape)
    else:
        grad_cb = _expand_backward_2d(g, x, codebooks, codes, need_input, need_codebooks,
                                      grad_x.view(x.shape) if need_input else None)
    return grad_x, (grad_cb if need_codebooks else codebooks.new_empty(0))


@linear_backward.register_fake
def _(grad, input, codebooks, codes, need_input, need_codebooks, path="auto"):
    check_linear_backward(grad, input, codebooks, codes)
    return (input.new_empty(input.shape) if need_input else input.new_empty(0),
            codebooks.new_empty(codebooks.shape) if need_codebooks else codebooks.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    input, codebooks, codes, bias, path = inputs
    ctx.save_for_backward(input, codebooks, codes)  # reason: never the dense weight; backward rebuilds what it needs
    # the path compute_path forced when the forward ran, for a backward run after it; the backward of an opt-in
    # lookup-table forward is the exact compressed one
    ctx.path = "compressed" if forced_path(path) in LUT_BITS else forced_path(path)


def _linear_autograd(ctx, grad):
    input, codebooks, codes = ctx.saved_tensors
    # reason: the dispatcher drops arguments equal to their defaults, and needs_input_grad with them
    need_input, need_codebooks, _, need_bias = (*ctx.needs_input_grad, False, False)[:4]
    grad_x = grad_cb = grad_bias = None
    if need_input or need_codebooks:
        grad_x, grad_cb = linear_backward(grad.contiguous(), input, codebooks, codes, need_input, need_codebooks,
                                          ctx.path)
    if need_bias:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return (grad_x if need_input else None), (grad_cb if need_codebooks else None), None, grad_bias, None


linear.register_autograd(_linear_autograd, setup_context=_linear_setup_context)


def _linear_backward_setup_context(ctx, inputs, output):
    grad, input, codebooks, codes, need_input, need_codebooks, path = inputs
    ctx.save_for_backward(grad, input, codebooks, codes)
    ctx.need_input, ctx.need_codebooks, ctx.path = need_input, need_codebooks, path


def _linear_double_backward(ctx, grad_grad_x, grad_grad_cb):
    """linear_backward is bilinear: grad_x = g E(cb), grad_cb = E^T(g^T x) (E: the expansion); its
    derivatives are linear and linear_backward again."""
    grad, input, codebooks, codes = ctx.saved_tensors
    needs_grad, needs_input, needs_codebooks = ctx.needs_input_grad[:3]  # always passed: never defaulted
    d_grad = d_input = d_codebooks = None
    if needs_grad:
        if ctx.need_input:
            d_grad = linear(grad_grad_x, codebooks, codes, None, ctx.path)
        if ctx.need_codebooks:
            term = linear(input, grad_grad_cb, codes, None, ctx.path)
            d_grad = term if d_grad is None else d_grad + term
    if needs_input and ctx.need_codebooks:
        d_input = linear_backward(grad, input, grad_grad_cb, codes, True, False, ctx.path)[0]
    if needs_codebooks and ctx.need_input:
        d_codebooks = linear_backward(grad, grad_grad_x, codebooks, codes, False, True, ctx.path)[1]
    return d_grad, d_input, d_codebooks, None, None, None, None


linear_backward.register_autograd(_linear_double_backward, setup_context=_linear_backward_setup_context)


# --------------------------------------------------------------------------- embedding: looked-up rows only

@torch.library.custom_op("rpq_fx::embedding", mutates_args=())
def embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, padding_idx: int | None = None,
              scale_grad_by_freq: bool = False) -> Tensor:
    """``F.embedding(indices, expand(codebooks, codes), padding_idx, scale_grad_by_freq=...)``, expanding
    only the looked-up rows: a lookup of M tokens costs M rows, not the whole table."""
    check_embedding(indices, codebooks, codes, padding_idx)
    num_codes = codebooks.shape[1]
    check_indices(indices, codes.shape[1])
    rows = codes.index_select(1, indices.reshape(-1))  # [C, M], the looked-up rows' codes
    check_codes(rows, num_codes, "rpq_fx embedding")  # reason: a code past K would read the next codebook
    # the looked-up rows are a small weight [M, C*d], built by the expand op's kernel (the C++ one on the CPU): 48 us
    # of CPU time against 62 for a flat index and one index_select (128 tokens of MiniLM's 30522x384, one thread)
    out = expand(codebooks, rows).contiguous()
    # reason: an op's output must not be a view (callers modify it in place under autograd); the expansion is fresh
    # and contiguous, so it takes the indices' shape in place, without the copy a view's clone would cost
    return out.resize_(*indices.shape, out.shape[1])


@embedding.register_fake
def _(indices, codebooks, codes, padding_idx=None, scale_grad_by_freq=False):
    check_embedding(indices, codebooks, codes, padding_idx)
    return codebooks.new_empty(*indices.shape, codes.shape[0] * codebooks.shape[2])


def _embedding_setup_context(ctx, inputs, output):
    indices, codebooks, codes, padding_idx, scale_grad_by_freq = inputs
    ctx.save_for_backward(indices, codes)
    ctx.padding_idx = check_embedding(indices, codebooks, codes, padding_idx)
    ctx.scale_grad_by_freq = scale_grad_by_freq
    ctx.groups, ctx.num_codes = codebooks.shape[0], codebooks.shape[1]


def _embedding_autograd(ctx, grad):
    indices, codes = ctx.saved_tensors
    flat = indices.reshape(-1)
    g = grad.reshape(flat.numel(), grad.shape[-1])
    if ctx.padding_idx is not None:
        g = g * (flat != ctx.padding_idx).to(g.dtype).unsqueeze(1)
    if ctx.scale_grad_by_freq:
        counts = torch.bincount(flat, minlength=codes.shape[1])
        g = g / counts.index_select(0, flat).to(g.dtype).unsqueeze(1)
    grad_cb = expand_backward(g.contiguous(), codes.index_select(1, flat), ctx.groups, ctx.num_codes)
    return None, grad_cb, None, None, None


embedding.register_autograd(_embedding_autograd, setup_context=_embedding_setup_context)


def hot_embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, hot_index: Tensor, num_rows: int) -> Tensor:
    """The hot rows' residuals (``RPQWeight.hot``) of the looked-up rows, zero for rows that are not hot:
    ``F.embedding(indices, zeros(num_rows, D).index_add(0, hot_index, expand(codebooks, codes)))``,
    expanding only the looked-up rows that are hot (an ONNX export holds the table of each row's
    hot slot, 4 bytes per row, as a constant)."""
    check_devices("rpq_fx hot_embedding", indices=indices, codebooks=codebooks, codes=codes, hot_index=hot_index)
    _require(hot_index.dim() == 1 and hot_index.numel() == codes.shape[1],
                 lambda: f"rpq_fx hot_embedding: hot_index must list the {codes.shape[1]} hot rows, got shape "
                         f"{tuple(hot_index.shape)}")
    slots = torch.full((num_rows,), -1, dtype=torch.int32, device=indices.device)
    # reason: index_copy and index_select check their indices (negative ones too), where slots[indices] wraps -1
    slots = slots.index_copy(0, hot_index.long(), torch.arange(hot_index.numel(), dtype=torch.int32,
                                                                device=indices.device))
    slot = slots.index_select(0, indices.reshape(-1)).view(indices.shape)
    rows = embedding(slot.clamp_min(0), codebooks, codes)
    return rows * (slot >= 0).unsqueeze(-1).to(rows.dtype)


# --------------------------------------------------------------------------- the C++ CPU kernels

# reason: the stock kernels registered for CPU over the C++ ones; the public expand op's own body checks first
_STOCK_CPU = {"expand": _expand_stock, **_STOCK}


@contextmanager
def stock_ops() -> Iterator[None]:
    """Within the block, CPU calls run the stock-op kernels even where the C++ kernels are loaded (the
    tests compare the two): registered over them for ``CPU``, and taken away again on exit."""
    lib = torch.library.Library("rpq_fx", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid")  # reason: overriding is the point here
        for name, kernel in _STOCK_CPU.items():
            lib.impl(name, kernel, "CPU")
    try:
        with _kernels.suspended():
            yield
    finally:
        lib._destroy()


_kernels.load()
