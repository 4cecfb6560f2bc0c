#!/usr/bin/env bash
# Builds the C++ kernels with AddressSanitizer (RPQ_FX_SANITIZE=address: a build of its own, keyed
# apart from the normal one, which it leaves alone) and runs the op tests on it, so that a kernel
# reading or writing outside its buffers aborts the run with ASan's report (issue 19).
# Extra arguments go to pytest, e.g. scripts/asan.sh -k bounds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
libasan=$(${CXX:-g++} -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then echo "asan: ${CXX:-g++} has no libasan.so (got '$libasan')" >&2; exit 2; fi
export RPQ_FX_SANITIZE=address
# reason: python and torch are not instrumented, so the ASan runtime must be loaded before them; and
# libstdc++ with it, or ASan's __cxa_throw interceptor finds no real one (a CHECK failure importing triton)
export LD_PRELOAD="$libasan $(${CXX:-g++} -print-file-name=libstdc++.so)"
# reason: CPython's and torch's own allocations look leaked at exit (not ours to fix); stop at the first error
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}"
.venv/bin/python -c "import rpq_fx._kernels as k; k.main()"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ops_compressed.py tests/test_ops_bounds.py \
  tests/test_ops_devices.py tests/test_ops_bf16.py tests/test_ops_lut.py tests/test_ops_fused.py "$@"
