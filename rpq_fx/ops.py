"""The expansion op: ``rpq_fx::expand(codebooks, codes) -> W``.

One ``torch.library`` custom op, so that a rewritten graph shows the expansion as a single named
node, and so that it runs under ``torch.compile``, ``torch.export`` and on the meta device.

Semantics: ``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]`` with ``g(c) = c`` for one codebook
per slice and ``g(c) = 0`` when a single codebook is shared by all slices.
"""

import torch
from torch import Tensor

__all__ = ["expand", "expand_backward"]


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
    groups, num_codes, dim = codebooks.shape
    num_codebooks, num_vectors = codes.shape
    index = _flat_index(codes, groups, num_codes)
    return codebooks.reshape(groups * num_codes, dim).index_select(0, index).view(num_vectors, num_codebooks * dim)


@expand.register_fake
def _(codebooks: Tensor, codes: Tensor) -> Tensor:
    torch._check(codebooks.dim() == 3, lambda: f"codebooks must be [G, K, d], got {tuple(codebooks.shape)}")
    torch._check(codes.dim() == 2, lambda: f"codes must be [C, N], got {tuple(codes.shape)}")
    return codebooks.new_empty(codes.shape[1], codes.shape[0] * codebooks.shape[2])


@torch.library.custom_op("rpq_fx::expand_backward", mutates_args=())
def expand_backward(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
    """Gradient of :func:`expand` w.r.t. the codebooks: each weight slice's gradient summed into its codeword."""
    num_codebooks, num_vectors = codes.shape
    dim = grad.shape[1] // num_codebooks
    index = _flat_index(codes, num_groups, num_codes)
    out = grad.new_zeros(num_groups * num_codes, dim)
    out.index_add_(0, index, grad.reshape(num_vectors * num_codebooks, dim))
    return out.view(num_groups, num_codes, dim)


@expand_backward.register_fake
def _(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> Tensor:
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
