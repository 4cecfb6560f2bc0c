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
