"""Eager RPQ modules: the weight and drop-in layers."""

from .layers import RPQ_LAYERS, RPQConv1d, RPQConv2d, RPQConv3d, RPQEmbedding, RPQLinear, from_dense
from .weight import RPQWeight

__all__ = ["RPQWeight", "RPQLinear", "RPQEmbedding", "RPQConv1d", "RPQConv2d", "RPQConv3d", "RPQ_LAYERS", "from_dense"]
