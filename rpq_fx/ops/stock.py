"""The kernels of the rpq_fx ops written with stock torch ops: every device, every dtype.

They are the ops' default implementations; on the CPU the C++ kernels (``csrc/rpq_kernels.cpp``,
the same arithmetic, registered with the dispatcher) take their place where they are built, and
:func:`rpq_fx.ops.stock_ops` puts these back for a block of code. Each checks the codes' values
before indexing: a flat index with one codebook per slice would read the next codebook.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_codes

__all__ = ["expand", "expand_backward_add", "linear_compressed", "linear_compressed_backward", "flat_index"]


def flat_index(codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
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


def _unsigned_index(codes: Tensor) -> Tensor:
    """Codes as int64 row numbers (int16 bit patterns read as unsigned); transient, never stored."""
    index = codes.to(torch.int64)
    return index & 0xFFFF if codes.dtype == torch.int16 else index


def expand(codebooks: Tensor, codes: Tensor) -> Tensor:
    """``W [N, C*d]`` from ``codebooks [G, K, d]`` and ``codes [C, N]``: one gather."""
    groups, num_codes, dim = codebooks.shape
    num_codebooks, num_vectors = codes.shape
    check_codes(codes, num_codes, "rpq_fx expand")
    index = flat_index(codes, groups, num_codes)
    return codebooks.reshape(groups * num_codes, dim).index_select(0, index).view(num_vectors, num_codebooks * dim)


def expand_backward_add(out: Tensor, grad: Tensor, codes: Tensor) -> None:
    """``out [G, K, d] += expand_backward(grad [N, C*d], codes [C, N])``: one scatter-add."""
    num_groups, num_codes, dim = out.shape
    check_codes(codes, num_codes, "rpq_fx expand_backward")
    num_codebooks, num_vectors = codes.shape
    index = flat_index(codes, num_groups, num_codes)
    out.view(num_groups * num_codes, dim).index_add_(0, index, grad.reshape(num_vectors * num_codebooks, dim))


def linear_compressed(x: Tensor, codebooks: Tensor, codes: Tensor) -> Tensor:
    """``x [..., in] @ W^T`` from codebooks and codes: a table per codebook, then a sum of C picks per output."""
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    check_codes(codes, num_codes, "rpq_fx linear")
    out = x.new_empty(*x.shape[:-1], out_features)
    x = x.reshape(-1, x.shape[-1])
    batch = x.shape[0]
    if batch == 0:
        return out
    cb = codebooks.expand(num_codebooks, num_codes, dim) if groups == 1 else codebooks
    table = torch.bmm(cb, x.reshape(batch, num_codebooks, dim).permute(1, 2, 0))  # [C, K, B]
    offsets = torch.arange(num_codebooks, device=codes.device, dtype=torch.int64) * num_codes
    index = (_unsigned_index(codes) + offsets[:, None]).t()  # [N, C]: bag n picks row c*K + codes[c, n]
    # reason: written through a 2-D view into a fresh tensor: an op's output must not be a view
    out.view(batch, out_features).copy_(F.embedding_bag(index, table.reshape(num_codebooks * num_codes, batch),
                                                        mode="sum").t())  # [N, B]
    return out


def linear_compressed_backward(grad: Tensor, x: Tensor, codebooks: Tensor, codes: Tensor, need_input: bool,
                               need_codebooks: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_codebooks)`` of :func:`linear_compressed` (each empty unless asked for): the output
    gradient scattered by code, then two small bmms against the codebooks and the input."""
    num_codebooks, out_features = codes.shape
    groups, num_codes, dim = codebooks.shape
    check_codes(codes, num_codes, "rpq_fx linear_backward")
    grad_x = x.new_empty(x.shape if need_input else (0,))
    x = x.reshape(-1, x.shape[-1])
    batch = x.shape[0]
    index = _unsigned_index(codes)
    grad_t = grad.reshape(batch, out_features).t().contiguous()  # [N, B]
    scattered = grad.new_zeros(num_codebooks, num_codes, batch)
    for c in range(num_codebooks):
        scattered[c].index_add_(0, index[c], grad_t)
    grad_cb = codebooks.new_empty(0)
    if need_input:
        cb = codebooks.expand(num_codebooks, num_codes, dim) if groups == 1 else codebooks
        grad_x.view(batch, num_codebooks, dim).copy_(torch.bmm(scattered.transpose(1, 2), cb).transpose(0, 1))
    if need_codebooks:
        grad_cb = torch.bmm(scattered, x.reshape(batch, num_codebooks, dim).transpose(0, 1))
        if groups == 1:
            grad_cb = grad_cb.sum(0, keepdim=True)
    return grad_x, grad_cb
