"""The one exception rpq_fx raises for a model it cannot convert."""

__all__ = ["RPQConversionError"]


class RPQConversionError(ValueError):
    """A model, or one of its layers, cannot be converted; the message names it and says why."""
