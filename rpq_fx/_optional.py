"""Optional dependencies: imported only where they are used, naming the extra that installs them."""

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or an ImportError that says what needs it and ``pip install 'rpq_fx[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs {module} ({error}): pip install 'rpq_fx[{extra}]'") from None
