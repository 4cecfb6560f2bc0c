"""The graph passes of rpq_fx, in pipeline order: capture → plan → rewrite → checkpoint → cleanup.

Installed as ``rpq_fx.passes``.
"""

from .capture import capture
from .checkpoint import insert_checkpoints
from .cleanup import cleanup
from .plan import LayerPlan, plan_conversion
from .rewrite import new_weights, rewrite

__all__ = ["capture", "plan_conversion", "LayerPlan", "new_weights", "rewrite", "insert_checkpoints", "cleanup"]
