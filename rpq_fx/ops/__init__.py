"""The ops of rpq_fx: ``rpq_fx::expand(codebooks, codes) -> W`` and the compressed-domain
``rpq_fx::linear`` and ``rpq_fx::embedding`` that compute without building ``W``.

- :mod:`.library`: the op definitions (schemas, fake kernels, autograd) and the loading of the C++
  CPU kernels, which the dispatcher reaches by device;
- :mod:`.conv`: ``rpq_fx::conv``, a convolution whose weight is expanded a block of output channels at a time, or
  computed from its codes (1x1, or unfolded) where that pays;
- :mod:`.stock`: the same kernels in stock torch ops (any device and dtype; the fallback);
- :mod:`.policy`: which way ``rpq_fx::linear`` computes each call (a CPU cost model; on CUDA a batch-size rule), and
  :func:`compute_path` to force it for a block of code;
- :mod:`.checks`: the validation every op shares (:func:`check_codes`);
- :mod:`.autocast`: how each op casts under ``torch.autocast``;
- :mod:`.triton`: Triton kernels registered for ``CUDA`` (stock ops where Triton cannot compute).
"""

from .checks import check_codes
from .library import embedding, expand, expand_backward, hot_embedding, linear, linear_backward, stock_ops
from .policy import PATHS, choose_path, compute_path
from . import conv as _conv  # noqa: F401  (defines rpq_fx::conv; the module keeps its name, not the op's)
from . import autocast as _autocast  # noqa: F401  (registers the autocast rules of the ops)
from . import triton as _triton_kernels  # noqa: F401  (registers the Triton kernels for CUDA)

__all__ = ["expand", "expand_backward", "linear", "linear_backward", "embedding", "hot_embedding", "choose_path",
           "compute_path", "PATHS", "check_codes", "stock_ops"]
