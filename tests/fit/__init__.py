# reason: a package, so that this folder's conftest.py imports as fit.conftest: a second top-level module named
# conftest would take the place of tests/conftest.py, which many tests import helpers from by name
