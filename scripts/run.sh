#!/usr/bin/env bash
# The main job: set up, then convert timm's resnet18 and vit_tiny, print their reports and write
# the rewritten graphs to rpq_fx_out/ (or the folder given with --out).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
.venv/bin/python examples/quickstart.py "$@"
