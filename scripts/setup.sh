#!/usr/bin/env bash
# Sets up .venv with rpq_fx (editable) and its test tools. Sourced by run.sh and test.sh; installs
# again only when pyproject.toml changes. PYTHON picks the interpreter (default: python3, 3.10+).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.rpq_fx-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing rpq_fx and its dependencies into .venv (first time: a few minutes)"
  # reason: this machine's pip mirrors print a warning for every package they lack; they are harmless
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
# The C++ kernels: built into .venv (about a minute), keyed by their source, torch version, compiler and
# flags (rpq_fx/_kernels.py); where they cannot be built rpq_fx runs on stock torch ops. Built again
# when the source or torch changes.
kstamp=.venv/.rpq_fx-kernels
kwant=$({ cat rpq_fx/csrc/*.cpp rpq_fx/_kernels.py; cat .venv/lib*/python*/site-packages/torch/version.py 2>/dev/null || true; } \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$kstamp" 2>/dev/null)" != "$kwant" ]; then
  if .venv/bin/python -c "import rpq_fx._kernels as k; k.main()"; then echo "$kwant" > "$kstamp"; else
    echo "setup: the C++ kernels did not build; rpq_fx uses stock torch ops (slower compressed-domain linear)"; fi
fi
