"""Integrations with other libraries' own extension points. :func:`register` registers those that work
by registration, where their library is installed: ``transformers`` (the ``"rpq"`` quantization method:
``save_pretrained`` / ``from_pretrained`` of converted models). ``rpq_fx.integrations.peft`` (LoRA on
converted linear layers) is imported where it is used. Importing this package imports neither library."""

import importlib.util
import sys

__all__ = ["register"]


def register() -> None:
    """Register every integration whose library is installed (``import rpq_fx`` calls this), when that
    library is imported: at once if it already is, else by a post-import hook (``wrapt``, in the ``hf``
    extra), so ``import rpq_fx`` alone never imports transformers (2.7 s, and the warnings of whatever
    quantization libraries transformers finds installed)."""
    if not _installed("transformers"):
        return
    if "transformers" in sys.modules or not _installed("wrapt"):
        _register_transformers()
    else:
        import wrapt

        wrapt.register_post_import_hook(lambda _module: _register_transformers(), "transformers")


def _register_transformers() -> None:
    from . import transformers  # noqa: F401  (registers the "rpq" quantization method on import)


def _installed(name: str) -> bool:
    """Whether ``name`` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # reason: find_spec raises for a module set to None in sys.modules (an import blocked)
        return False
