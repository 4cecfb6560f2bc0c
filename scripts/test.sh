#!/usr/bin/env bash
# Set up, then run the whole test suite; extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/python -m pytest -n 2 --dist loadgroup "$@"  # loadgroup: the one torchrun launch runs once
