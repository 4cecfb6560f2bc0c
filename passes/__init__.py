"""The graph passes of rpq_fx, in pipeline order: capture → plan → rewrite → fuse → inplace adds → checkpoint →
cleanup.

Installed as ``rpq_fx.passes``.
"""

from .capture import capture, capture_call, capture_export, capture_layer
from .checkpoint import insert_checkpoints
from .cleanup import cleanup
from .fuse import fuse
from .inplace import inplace_adds
from .plan import LayerPlan, check_strict, plan_conversion
from .rewrite import is_expansion, new_weights, rewrite
from .weight_ops import register_layer

__all__ = ["capture", "capture_call", "capture_export", "capture_layer", "plan_conversion",
           "check_strict", "LayerPlan", "new_weights", "rewrite", "is_expansion", "fuse", "inplace_adds",
           "insert_checkpoints", "cleanup", "register_layer"]
