"""``python -m rpq_fx``: the ``rpq-fx`` command line."""

from .cli import _entry

if __name__ == "__main__":
    _entry()
