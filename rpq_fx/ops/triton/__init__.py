"""Triton kernels of the rpq_fx ops, registered with the dispatcher for ``CUDA``.

- :mod:`.expand`: ``rpq_fx::expand`` (any float dtype), the rows an ``rpq_fx::embedding`` looks up
  (the hot rows' residuals go through the same two ops), and ``rpq_fx::_expand_backward_add``;
- :mod:`.linear`: ``rpq_fx::_linear_compressed`` and its backward: lookup tables for a few rows, a
  fused "gather a tile of W, then ``tl.dot``" GEMM above, W never written to global memory;
- :mod:`.cuda`: the registered implementations: the stock kernels' checks, then a Triton kernel, or
  the stock kernel where Triton cannot compute (``report`` says why: :func:`rpq_fx._triton.status`).

On CPU tensors the dispatcher never reaches them (the C++ kernels or stock ops compute there); the
tests run them on the CPU through Triton's interpreter by calling the launchers directly.
"""

import torch

from . import cuda

__all__: list[str] = []

_KERNELS = {
    "rpq_fx::expand": cuda.expand,
    "rpq_fx::embedding": cuda.embedding,
    "rpq_fx::_expand_backward_add": cuda.expand_backward_add,
    "rpq_fx::_linear_compressed": cuda.linear_compressed,
    "rpq_fx::_linear_compressed_backward": cuda.linear_compressed_backward,
}
for _op, _kernel in _KERNELS.items():
    torch.library.register_kernel(_op, "cuda", _kernel)
