"""Eager RPQ modules: the weight and drop-in layers."""

from .layers import RPQConv1d, RPQConv2d, RPQConv3d, RPQEmbedding, RPQLinear
from .weight import RPQWeight

__all__ = ["RPQWeight", "RPQLinear", "RPQEmbedding", "RPQConv1d", "RPQConv2d", "RPQConv3d"]
