"""Drop-in layers whose weight is an :class:`RPQWeight` (the reference RPQ's eager modules)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear as rpq_linear
from ..ops.conv import fused_pays
from ..ops.conv import conv as rpq_conv
from .weight import RPQWeight

__all__ = ["RPQLinear", "RPQEmbedding", "RPQConv1d", "RPQConv2d", "RPQConv3d", "RPQ_LAYERS", "from_dense"]


def _split(row_len: int, num_codebooks: int, where: str) -> int:
    if isinstance(num_codebooks, bool) or not isinstance(num_codebooks, int) or num_codebooks < 1:
        raise ValueError(f"{where}: num_codebooks must be a positive int, got {num_codebooks!r}")
    if row_len % num_codebooks:
        raise ValueError(f"{where}: row length {row_len} is not divisible by num_codebooks={num_codebooks}")
    return row_len // num_codebooks


class RPQLinear(nn.Module):
    """``nn.Linear`` with an RPQ weight: rows are output neurons, split over the input features.

    The forward is ``rpq_fx::linear``: per call, computed in the compressed domain (the dense
    weight never built) or by expanding the weight, whichever is cheaper for the batch size; one
    call per additive stage (``additive_codebooks``), summed.
    """

    def __init__(self, in_features: int, out_features: int, num_codebooks: int, bias: bool = True, *,
                 num_codes: int = 256, shared_codebooks: bool = False, additive_codebooks: int = 1, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dim = _split(in_features, num_codebooks, "RPQLinear")
        self.weight = RPQWeight(num_codebooks, dim, out_features, num_codes, shared_codebooks,
                                additive_codebooks=additive_codebooks, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if self.bias is not None and not self.bias.is_meta:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.hot is not None:
            return F.linear(input, weight(), self.bias)
        out = rpq_linear(input, weight.compute_codebooks(), weight.codes, self.bias)
        for stage in weight.additive or ():  # the op is linear in the weight: one call per stage, bias once
            out = out + rpq_linear(input, stage.compute_codebooks(), stage.codes)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class RPQEmbedding(nn.Embedding):
    """``nn.Embedding`` with an RPQ weight: rows are embeddings, split over the embedding dim.

    The forward is ``rpq_fx::embedding``: only the looked-up rows are expanded (one lookup per
    additive stage, summed).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, num_codebooks: int,
                 padding_idx: int | None = None, *, scale_grad_by_freq: bool = False, num_codes: int = 256,
                 shared_codebooks: bool = False, additive_codebooks: int = 1, device=None, dtype=None):
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"RPQEmbedding: padding_idx must be within num_embeddings={num_embeddings}, "
                             f"got {padding_idx}")
        dim = _split(embedding_dim, num_codebooks, "RPQEmbedding")
        # reason: an nn.Embedding (transformers resizes only those, and reads its weight's data, which RPQWeight
        # refuses with a clear message), built on the meta device as the RPQ convolutions are
        super().__init__(num_embeddings, embedding_dim, padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                         device="meta", dtype=dtype)
        del self.weight
        self.weight = RPQWeight(num_codebooks, dim, num_embeddings, num_codes, shared_codebooks,
                                additive_codebooks=additive_codebooks, device=device, dtype=dtype)
        self.weight.reset_parameters("normal", zero_rows=() if self.padding_idx is None else (self.padding_idx,))

    def reset_parameters(self) -> None:
        # reason: nn.Embedding.__init__ calls this to initialise a dense weight; the RPQ weight initialises itself
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.weight.lookup(input, self.padding_idx, self.scale_grad_by_freq)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class _RPQConvMixin:
    """Builds the torch conv on the meta device (no dense weight is ever allocated), then swaps in
    an RPQ weight whose rows are output channels; torch's own ``_conv_forward`` does the rest."""

    def _make_rpq(self, num_codebooks: int, num_codes: int, shared_codebooks: bool, additive_codebooks: int, device,
                  dtype) -> None:
        shape = tuple(self.weight.shape)
        dim = _split(math.prod(shape[1:]), num_codebooks, type(self).__name__)
        del self.weight
        self.weight = RPQWeight(num_codebooks, dim, shape[0], num_codes, shared_codebooks, shape=shape,
                                additive_codebooks=additive_codebooks, device=device, dtype=dtype)
        if self.bias is not None:
            fan_in = math.prod(shape[1:])
            self.bias = nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype))
            if not self.bias.is_meta:
                nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def reset_parameters(self) -> None:
        # reason: torch's _ConvNd.__init__ calls this to init a dense weight; the RPQ weight inits itself
        pass

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str) and weight.hot is None
                and weight.additive is None and fused_pays(weight.shape, weight.dtype, self.stride, self.padding,
                                                           self.groups, tuple(weight.codebooks.shape))):
            # a big weight is expanded a block of output channels at a time, a pointwise one can compute from its
            # codes (rpq_fx.ops.conv)
            return rpq_conv(input, weight.compute_codebooks(), weight.codes, self.bias, list(weight.shape),
                            list(self.stride), list(self.padding), list(self.dilation), self.groups)
        # reason: torch's _conv_forward handles every padding_mode; reuse it rather than copy it
        return self._conv_forward(input, weight(), self.bias)


def _conv_class(base: type[nn.Module]) -> type[nn.Module]:
    class RPQConv(_RPQConvMixin, base):
        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                     groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                     num_codebooks: int, num_codes: int = 256, shared_codebooks: bool = False,
                     additive_codebooks: int = 1):
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                             bias, padding_mode, device="meta", dtype=dtype)
            self._make_rpq(num_codebooks, num_codes, shared_codebooks, additive_codebooks, device, dtype)

    RPQConv.__name__ = RPQConv.__qualname__ = f"RPQ{base.__name__}"
    RPQConv.__doc__ = f"``nn.{base.__name__}`` with an RPQ weight (rows are output channels)."
    return RPQConv


RPQConv1d = _conv_class(nn.Conv1d)
RPQConv2d = _conv_class(nn.Conv2d)
RPQConv3d = _conv_class(nn.Conv3d)


RPQ_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: RPQLinear, nn.Embedding: RPQEmbedding, nn.Conv1d: RPQConv1d, nn.Conv2d: RPQConv2d, nn.Conv3d: RPQConv3d}


def from_dense(layer: nn.Module, weight: RPQWeight) -> nn.Module:
    """The RPQ layer (:data:`RPQ_LAYERS`) of the built-in ``layer`` (exactly ``nn.Linear``, ...), with
    ``weight`` in place of its dense weight and everything else of it kept: its bias and other
    tensors, its attributes (``in_features``, ``stride``, ``padding_idx``, ones you set), its hooks
    and train/eval flag. ``layer`` itself is not changed."""
    cls = RPQ_LAYERS[type(layer)]
    if tuple(weight.shape) != tuple(layer.weight.shape) or weight.transposed:
        raise ValueError(f"from_dense: an RPQ weight of shape {weight.shape} cannot stand in for the "
                         f"{list(layer.weight.shape)} weight of {type(layer).__name__}")
    result = cls.__new__(cls)
    state = dict(vars(layer))
    state["_parameters"] = {name: p for name, p in layer._parameters.items() if name != "weight"}
    state["_buffers"] = dict(layer._buffers)
    state["_modules"] = {**layer._modules, "weight": weight}
    vars(result).update(state)
    weight.train(layer.training)
    return result
