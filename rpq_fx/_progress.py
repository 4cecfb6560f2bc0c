"""``progress_bar``: the one progress bar every rpq_fx loop uses.

A bar redrawn into a log file or a CI console is hundreds of lines of carriage returns, so the bar
is drawn only where it can redraw itself in place: a terminal on stderr, or a Jupyter notebook
(tqdm's widget). Everywhere else it is silent and costs nothing.
"""

import sys

from tqdm.auto import tqdm
from tqdm.autonotebook import tqdm as _notebook_or_std
from tqdm.std import tqdm as _std

__all__ = ["progress_bar", "draws", "note"]


def draws() -> bool:
    """True where a bar can redraw in place: stderr is a terminal, or this is a notebook kernel."""
    if _notebook_or_std is not _std:  # tqdm.autonotebook chose its widget: an IPython kernel
        return True
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A ``tqdm`` bar over ``iterable`` (or with ``total=``), drawn only if ``enabled`` and
    :func:`draws`; ``kwargs`` go to ``tqdm`` (``total``, ``unit``, ``delay``, ``bar_format``...)."""
    return tqdm(iterable, desc=desc, disable=not (enabled and draws()), file=sys.stderr, **kwargs)


def note(text: str) -> None:
    """Print ``text`` on stderr without breaking a bar being drawn there."""
    tqdm.write(text, file=sys.stderr)
