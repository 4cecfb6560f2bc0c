"""Integrations with other libraries' own extension points. :func:`register` registers those that work
by registration, where their library is installed: ``transformers`` (the ``"rpq"`` quantization method:
``save_pretrained`` / ``from_pretrained`` of converted models). ``rpq_fx.integrations.peft`` (LoRA on
converted linear layers) is imported where it is used. Importing this package imports neither library."""

import importlib.util

__all__ = ["register"]


def register() -> None:
    """Register every integration whose library is installed (``import rpq_fx`` calls this)."""
    if _installed("transformers"):
        from . import transformers  # noqa: F401  (registers the "rpq" quantization method on import)


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # reason: find_spec raises for a module set to None in sys.modules (an import blocked)
        return False
