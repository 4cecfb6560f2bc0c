"""The ops of rpq_fx: ``rpq_fx::expand(codebooks, codes) -> W`` and the compressed-domain
``rpq_fx::linear`` and ``rpq_fx::embedding`` that compute without building ``W``.

Each is a ``torch.library`` custom op, so that a rewritten graph shows it as a single named
node, and so that it runs under ``torch.compile``, ``torch.export`` and on the meta device.

Semantics: ``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]`` with ``g(c) = c`` for one codebook
per slice and ``g(c) = 0`` when a single codebook is shared by all slices.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels

__all__ = ["expand", "expand_backward", "linear", "linear_backward", "embedding", "hot_embedding", "choose_path",
           "PATHS", "check_codes"]


_CODE_DTYPES = (torch.uint8, torch.int16)


def _require(cond, message) -> None:
    """``torch._check`` (symbolic shapes under fake tensors too), with a fast path for a plain ``True``."""
    if cond is not True:  # reason: torch._check costs ~0.7 us a call: a few percent of a batch-1 linear
        torch._check(cond, message)


def _require_type(cond, message) -> None:
    """:func:`_require` raising ``TypeError``."""
    if cond is not True:
        torch._check_type(cond, message)


def check_codes(codes: Tensor, num_codes: int, where: str) -> None:
    """Raise ``IndexError`` naming ``where`` unless ``codes`` are uint8 / int16 codes all below ``num_codes``.

    int16 codes are read as unsigned bit patterns (codes above 32767). The one check every entry
    point (ops, ``RPQWeight`` state, checkpoints) shares, so no code can index past a codebook; the
    C++ kernels make the same check inline (``check_codes`` in csrc/rpq_kernels.cpp).
    """
    if codes.dtype not in _CODE_DTYPES:
        raise TypeError(f"{where}: codes must be uint8 or int16, got {codes.dtype}")
    capacity = 256 if codes.dtype == torch.uint8 else 65536
    if num_codes >= capacity or codes.numel() == 0 or codes.is_meta:
        return
    if codes.dtype == torch.uint8:
        largest = int(codes.max())
    else:
        low, high = torch.aminmax(codes)
        # reason: a negative int16 is a code above 32767; only then is the unsigned view worth its copy
        largest = int(high) if int(low) >= 0 else int((codes.to(torch.int32) & 0xFFFF).max())
    if largest >= num_codes:
        raise IndexError(f"{where}: code {largest} is out of range for {num_codes} codewords (codes must be < {num_codes})")


def _check_code_dtype(codes: Tensor, op: str) -> None:
    _require_type(codes.dtype in _CODE_DTYPES, lambda: f"{op}: codes must be uint8 or int16, got {codes.dtype}")


def _check_devices(op: str, **tensors: Tensor | None) -> None:
    """All tensors on one device, as a dense layer requires: a meta weight called on a CPU input must
    raise, not hand back an uninitialised CPU tensor (issue 19)."""
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
        raise RuntimeError(f"{op}: tensors on different devices ({where}); all must be on one device")


def _check_expand(codebooks: Tensor, codes: Tensor, op: str = "rpq_fx expand") -> None:
    """Shapes and dtypes of ``expand(codebooks [G, K, d], codes [C, N])``, G = C or 1 (values: :func:`check_codes`)."""
    _check_devices(op, codebooks=codebooks, codes=codes)
    _require(codebooks.dim() == 3, lambda: f"{op}: codebooks must be [G, K, d], got {tuple(codebooks.shape)}")
    _require(codes.dim() == 2, lambda: f"{op}: codes must be [C, N], got {tuple(codes.shape)}")
    _check_code_dtype(codes, op)
    _require(codebooks.shape[0] in (1, codes.shape[0]),
                 lambda: f"{op}: {codebooks.shape[0]} codebooks for {codes.shape[0]} slices (want {codes.shape[0]} or 1)")


def _check_expand_backward(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> None:
    op = "rpq_fx expand_backward"
    _check_devices(op, grad=grad, codes=codes)
    _require(codes.dim() == 2 and codes.shape[0] >= 1,
                 lambda: f"{op}: codes must be [C, N] with C >= 1, got {tuple(codes.shape)}")
    _check_code_dtype(codes, op)
    _require(grad.dim() == 2 and grad.shape[0] == codes.shape[1] and grad.shape[1] % codes.shape[0] == 0,
                 lambda: f"{op}: grad must be [N, C*d] = [{codes.shape[1]}, {codes.shape[0]}*d] for codes "
                         f"{tuple(codes.shape)}, got {tuple(grad.shape)}")
    _require(num_groups in (1, codes.shape[0]),
                 lambda: f"{op}: num_groups must be {codes.shape[0]} or 1, got {num_groups}")
    _require(num_codes >= 1, lambda: f"{op}: num_codes must be positive, got {num_codes}")


def _flat_index(codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    """Row index into ``codebooks.view(G*K, d)`` for every ``(n, c)``, laid out ``[N, C]``.

    The index is transient int32 (index_select takes no uint8), 4 bytes per code: 1/d the size
    of the weight it builds, and freed as soon as the gather is done.
    """
    index = codes.t().to(torch.int32)
    if codes.dtype == torch.int16:
        index = index & 0xFFFF  # reason: codes above 32767 are stored as int16 bit patterns
    if num_groups > 1:
        index = index + torch.arange(codes.shape[0], device=codes.device, dtype=torch.int32) * num_codes
    return index.reshape(-1)


@torch.library.custom_op("rpq_fx::expand", mutates_args=())
def expand(codebooks: Tensor, codes: Tensor) -> Tensor:
    """Expand ``codebooks [G, K, d]`` and ``codes [C, N]`` into the dense weight ``[N, C*d]``."""
    _check_expand(codebooks, codes)
    if codebooks.device.type == "cpu" and codes.device.type == "cpu" and _kernels.kernels() is not None:
        return _kernels.kernels().expand(codebooks, codes)  # reads the uint8 codes as they are: no index built
    groups, num_codes, dim = codebooks.shape
    check_codes(codes, num_codes, "rpq_fx expand")  # reason: the flat index would read the next codebook
    num_codebooks, num_vectors = codes.shape
    index = _flat_index(codes, groups, num_codes)
    return codebooks.reshape(groups * num_codes, dim).index_select(0, index).view(num_vectors, num_codebooks * dim)


@expand.register_fake
def _(codebooks: Tensor, codes: Tensor) -> Tensor:
    _check_expand(codebooks, codes)
    return codebooks.new_empty(codes.shape[1], codes.shape[0] * codebooks.shape[2])


@torch.library.custom_op("rpq_fx::expand_backward", mutates_args=())
def expand_backward(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    """Gradient of :func:`expand` w.r.t. the codebooks: each weight slice's gradient summed into its codeword."""
    _check_expand_backward(grad, codes, num_groups, num_codes)
    out = grad.new_zeros(num_groups, num_codes, grad.shape[1] // codes.shape[0])
    _add_expand_backward(out, grad, codes)
    return out


def _add_expand_backward(out: Tensor, grad: Tensor, codes: Tensor) -> None:
    """``out [G, K, d] += expand_backward(grad [N, C*d], codes [C, N])``."""
    num_groups, num_codes, dim = out.shape
    if (grad.device.type == "cpu" and codes.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64)
            and out.is_contiguous() and _kernels.kernels() is not None):
        _kernels.kernels().expand_backward(grad, codes, num_groups, num_codes, out)
        return
    check_codes(codes, num_codes, "rpq_fx expand_backward")  # reason: the flat index would write the next codebook
    num_codebooks, num_vectors = codes.shape
    index = _flat_index(codes, num_groups, num_codes)
    out.view(num_groups * num_codes, dim).index_add_(0, index, grad.reshape(num_vectors * num_codebooks, dim))


@expand_backward.register_fake
def _(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    _check_expand_backward(grad, codes, num_groups, num_codes)
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

PATHS = ("auto", "compressed", "expand")
_PATH_ENV = "RPQ_FX_PATH"
_EXPAND_BLOCK_BYTES = 8 * 2**20  # weight rows expanded at a time on the expand path (see _row_blocks)


def _unsigned_index(codes: Tensor) -> Tensor:
    """Codes as int64 row numbers (int16 bit patterns read as unsigned); transient, never stored."""
    index = codes.to(torch.int64)
    return index & 0xFFFF if codes.dtype == torch.int16 else index


def _padded_batch(batch: int) -> int:
    """The batch the C++ kernels compute for: blocks of 1, 2, 4, 8, 16 or 32 columns."""
    if batch <= 16:
        return 1 << max(0, (batch - 1).bit_length())
    return -(-batch // 32) * 32


def _cost_ns(path: str, batch: int, in_features: int, out_features: int, num_codebooks: int, num_codes: int,
             codebook_dim: int, itemsize: int, device: torch.device, fast_kernels: bool, backward: bool) -> float:
    """A rough time model (nanoseconds), fitted to 2-core AVX-512 CPU measurements (benchmarks/linear.py).

    Only the ratio of the two paths matters. The dense weight is ``out * in`` values; the compressed
    path's backward scratch is ``C * K * B`` values, and above glibc's largest mmap threshold (32 MiB)
    a fresh buffer costs page faults.
    """
    B, N, C, K, d = batch, out_features, num_codebooks, num_codes, codebook_dim
    weight = N * in_features
    if device.type == "cuda":
        # reason: untimed here (no GPU in CI); bandwidth and tensor-core rates of a recent data-centre GPU
        mac, move, add = 1 / 50e3, 1 / 500.0, 1 / 300.0
        launch = 4 * 5e3
        compressed = launch + mac * B * K * in_features + add * B * C * N + move * C * K * d
        expand = launch + move * 2 * weight + mac * B * weight
        return (2 * compressed if backward else compressed) if path == "compressed" else (
            (2 * expand + move * 2 * weight) if backward else expand)
    expansion = 1.0 * weight  # the weight built in cache-sized blocks, and read once by a GEMM
    gemm = 0.013 * itemsize / 4 * B * weight
    mac = 0.007 * itemsize / 4
    row_add = (0.27 if fast_kernels else 0.6) * itemsize / 4
    padded = _padded_batch(B) if fast_kernels else max(B, 1)
    table = mac * max(B, 8) * K * in_features + 0.15 * C * K * d
    if not backward:
        if path == "compressed":
            return table + row_add * padded * C * N + 2e3
        return expansion + gemm + 2e3
    if path == "compressed":
        scratch = C * K * padded
        scratch_fresh = 2.0 if scratch * itemsize > 32 * 2**20 else 0.3
        return scratch_fresh * scratch + 2 * row_add * padded * C * N + 2 * table + 4e3
    # the weight rebuilt, two GEMMs, the dense weight gradient (block by block) and its sum into the codebooks
    return expansion + 2 * gemm + 0.5 * weight + 0.5 * weight + 10 * C * N + 4e3


def choose_path(input: Tensor, codebooks: Tensor, codes: Tensor, path: str = "auto", backward: bool = False) -> str:
    """``"compressed"`` or ``"expand"`` for one linear call (``path`` forces it; ``RPQ_FX_PATH`` overrides auto)."""
    if path == "auto":
        path = os.environ.get(_PATH_ENV, "auto") or "auto"
    if path not in PATHS:
        raise ValueError(f"rpq_fx linear: path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    num_codebooks, out_features = codes.shape
    in_features = input.shape[-1]
    batch = input.numel() // in_features if in_features else 0
    fast = _fast_kernels_apply(input, codebooks)
    args = (batch, in_features, out_features, num_codebooks, codebooks.shape[1], codebooks.shape[2],
            input.element_size(), input.device, fast, backward)
    return "compressed" if _cost_ns("compressed", *args) <= _cost_ns("expand", *args) else "expand"


def _fast_kernels_apply(x: Tensor, codebooks: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and codebooks.dtype == x.dtype
            and _kernels.kernels() is not None)


# --------------------------------------------------------------------------- the two paths, 2-D input

def _compressed_forward(x: Tensor, codebooks: Tensor, codes: Tensor, out: Tensor) -> None:
    """``out [B, N] = x [B, in] @ W^T`` from codebooks and codes: a table per codebook, then a sum of C
    picks per output."""
    if _fast_kernels_apply(x, codebooks):
        _kernels.kernels().linear_forward(x, codebooks, codes, out)
        return
    batch = x.shape[0]
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    check_codes(codes, num_codes, "rpq_fx linear")  # reason: the flat index would read the next codebook's table
    cb = codebooks.expand(num_codebooks, num_codes, dim) if groups == 1 else codebooks
    table = torch.bmm(cb, x.reshape(batch, num_codebooks, dim).permute(1, 2, 0))  # [C, K, B]
    offsets = torch.arange(num_codebooks, device=codes.device, dtype=torch.int64) * num_codes
    index = (_unsigned_index(codes) + offsets[:, None]).t()  # [N, C]: bag n picks row c*K + codes[c, n]
    out.copy_(F.embedding_bag(index, table.reshape(num_codebooks * num_codes, batch), mode="sum").t())  # [N, B]


def _compressed_backward(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                         need_codebooks: bool, grad_x: Tensor) -> Tensor | None:
    """Writes the input gradient into ``grad_x`` (if ``need_input``); returns the codebooks' (if asked)."""
    if _fast_kernels_apply(x, codebooks) and grad.dtype == x.dtype:
        _, grad_cb = _kernels.kernels().linear_backward(grad, x, codebooks, codes, need_input, need_codebooks,
                                                        grad_x if need_input else None)
        return grad_cb if need_codebooks else None
    batch = x.shape[0]
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    check_codes(codes, num_codes, "rpq_fx linear_backward")
    index = _unsigned_index(codes)
    grad_t = grad.t().contiguous()  # [N, B]
    scattered = grad.new_zeros(num_codebooks, num_codes, batch)
    for c in range(num_codebooks):
        scattered[c].index_add_(0, index[c], grad_t)
    grad_cb = None
    if need_input:
        cb = codebooks.expand(num_codebooks, num_codes, dim) if groups == 1 else codebooks
        grad_x.view(batch, num_codebooks, dim).copy_(torch.bmm(scattered.transpose(1, 2), cb).transpose(0, 1))
    if need_codebooks:
        grad_cb = torch.bmm(scattered, x.reshape(batch, num_codebooks, dim).transpose(0, 1))
        if groups == 1:
            grad_cb = grad_cb.sum(0, keepdim=True)
    return grad_cb


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
            _add_expand_backward(grad_cb, grad[:, rows].t() @ x, block_codes)
    return grad_cb


def _check_linear(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None,
                  op: str = "rpq_fx linear") -> None:
    _check_devices(op, input=input, codebooks=codebooks, codes=codes, bias=bias)
    _check_expand(codebooks, codes, op)
    _require(input.dim() >= 1 and input.shape[-1] == codes.shape[0] * codebooks.shape[2],
                 lambda: f"{op}: input has {input.shape[-1] if input.dim() else 0} features, the weight "
                         f"{codes.shape[0]}x{codebooks.shape[2]} = {codes.shape[0] * codebooks.shape[2]}")
    _require(bias is None or tuple(bias.shape) == (codes.shape[1],),
                 lambda: f"{op}: bias must be [{codes.shape[1]}], got {tuple(bias.shape)}")


def _check_linear_backward(grad: Tensor, input: Tensor, codebooks: Tensor, codes: Tensor) -> None:
    _check_devices("rpq_fx linear_backward", grad=grad, input=input)
    _check_linear(input, codebooks, codes, None, "rpq_fx linear_backward")
    _require(grad.shape == (*input.shape[:-1], codes.shape[1]),
                 lambda: f"rpq_fx linear_backward: grad must be {(*input.shape[:-1], codes.shape[1])} for input "
                         f"{tuple(input.shape)} and {codes.shape[1]} outputs, got {tuple(grad.shape)}")
    _require(grad.dtype == input.dtype,
                 lambda: f"rpq_fx linear_backward: grad is {grad.dtype}, input {input.dtype}: want one dtype")


@torch.library.custom_op("rpq_fx::linear", mutates_args=())
def linear(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None = None, path: str = "auto") -> Tensor:
    """``F.linear(input, expand(codebooks, codes), bias)``, choosing per call how to compute it.

    ``path="compressed"`` never builds the weight; ``"expand"`` builds it and calls ``F.linear``;
    ``"auto"`` (or the ``RPQ_FX_PATH`` environment variable) picks the cheaper by :func:`choose_path`.
    """
    _check_linear(input, codebooks, codes, bias)
    out_features = codes.shape[1]
    # reason: written through a 2-D view into a fresh tensor: an op's output must not be a view (callers modify it in place)
    out = input.new_empty(*input.shape[:-1], out_features)
    x, out_2d = input.reshape(-1, input.shape[-1]), out.view(-1, out_features)
    if x.shape[0] == 0:
        return out
    if choose_path(input, codebooks, codes, path) == "expand":
        _expand_forward(x, codebooks, codes, bias, out_2d)
        return out
    _compressed_forward(x, codebooks, codes, out_2d)
    if bias is not None:
        out_2d.add_(bias)
    return out


@linear.register_fake
def _(input, codebooks, codes, bias=None, path="auto"):
    _check_linear(input, codebooks, codes, bias)
    return input.new_empty(*input.shape[:-1], codes.shape[1])


@torch.library.custom_op("rpq_fx::linear_backward", mutates_args=())
def linear_backward(grad: Tensor, input: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                    need_codebooks: bool, path: str = "auto") -> tuple[Tensor, Tensor]:
    """``(grad_input, grad_codebooks)`` of :func:`linear` (bias aside); an output not asked for is empty."""
    _check_linear_backward(grad, input, codebooks, codes)
    in_features = input.shape[-1]
    g = grad.reshape(-1, codes.shape[1])
    x = input.reshape(-1, in_features)
    grad_x = input.new_empty(input.shape if need_input else (0,))
    grad_x_2d = grad_x.view(x.shape) if need_input else None
    if g.shape[0] == 0:
        grad_x.zero_()
        grad_cb = codebooks.new_zeros(codebooks.shape)
    elif choose_path(input, codebooks, codes, path, backward=True) == "expand":
        grad_cb = _expand_backward_2d(g, x, codebooks, codes, need_input, need_codebooks, grad_x_2d)
    else:
        grad_cb = _compressed_backward(g, x, codebooks, codes, need_input, need_codebooks, grad_x_2d)
    return grad_x, (grad_cb if need_codebooks else codebooks.new_empty(0))


@linear_backward.register_fake
def _(grad, input, codebooks, codes, need_input, need_codebooks, path="auto"):
    _check_linear_backward(grad, input, codebooks, codes)
    return (input.new_empty(input.shape) if need_input else input.new_empty(0),
            codebooks.new_empty(codebooks.shape) if need_codebooks else codebooks.new_empty(0))


def _linear_setup_context(ctx, inputs, output):
    input, codebooks, codes, bias, path = inputs
    ctx.save_for_backward(input, codebooks, codes)  # reason: never the dense weight; backward rebuilds what it needs
    ctx.path = path


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

def _check_embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, padding_idx: int | None) -> int | None:
    _check_devices("rpq_fx embedding", indices=indices, codebooks=codebooks, codes=codes)
    _check_expand(codebooks, codes, "rpq_fx embedding")
    _require(not indices.is_floating_point() and not indices.is_complex(),
                 lambda: f"rpq_fx embedding: indices must be integers, got {indices.dtype}")
    num_embeddings = codes.shape[1]
    if padding_idx is None:
        return None
    _require(-num_embeddings <= padding_idx < num_embeddings,
                 lambda: f"rpq_fx embedding: padding_idx must be within num_embeddings={num_embeddings}, got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def _check_indices(indices: Tensor, num_embeddings: int) -> None:
    """Every index in ``[0, num_embeddings)``, as ``F.embedding`` requires (a real tensor's values)."""
    if indices.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(indices))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(f"rpq_fx embedding: index {bad} is out of range for {num_embeddings} rows "
                         f"(indices must be in [0, {num_embeddings}))")


@torch.library.custom_op("rpq_fx::embedding", mutates_args=())
def embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, padding_idx: int | None = None,
              scale_grad_by_freq: bool = False) -> Tensor:
    """``F.embedding(indices, expand(codebooks, codes), padding_idx, scale_grad_by_freq=...)``, expanding
    only the looked-up rows: a lookup of M tokens costs M rows, not the whole table."""
    _check_embedding(indices, codebooks, codes, padding_idx)
    groups, num_codes, dim = codebooks.shape
    _check_indices(indices, codes.shape[1])
    rows = codes.index_select(1, indices.reshape(-1))  # [C, M], the looked-up rows' codes
    check_codes(rows, num_codes, "rpq_fx embedding")  # reason: the flat index would read the next codebook
    out = codebooks.new_empty(*indices.shape, codes.shape[0] * dim)
    # reason: gathered through a view into a fresh tensor: an op's output must not be a view
    torch.index_select(codebooks.reshape(groups * num_codes, dim), 0, _flat_index(rows, groups, num_codes),
                       out=out.view(-1, dim))
    return out


@embedding.register_fake
def _(indices, codebooks, codes, padding_idx=None, scale_grad_by_freq=False):
    _check_embedding(indices, codebooks, codes, padding_idx)
    return codebooks.new_empty(*indices.shape, codes.shape[0] * codebooks.shape[2])


def _embedding_setup_context(ctx, inputs, output):
    indices, codebooks, codes, padding_idx, scale_grad_by_freq = inputs
    ctx.save_for_backward(indices, codes)
    ctx.padding_idx = _check_embedding(indices, codebooks, codes, padding_idx)
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
    _check_devices("rpq_fx hot_embedding", indices=indices, codebooks=codebooks, codes=codes, hot_index=hot_index)
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
