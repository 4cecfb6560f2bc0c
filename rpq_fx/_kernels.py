"""The optional C++ kernels of the compressed-domain linear (``csrc/rpq_kernels.cpp``).

Built on first use with ``torch.utils.cpp_extension.load`` (gcc and ninja; about a minute, once
per machine: the build is cached under ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), for the CPU it runs on. ``scripts/setup.sh`` builds it ahead of
time. Where it cannot be built, or with ``RPQ_FX_KERNELS=torch``, rpq_fx computes the same thing
with stock torch ops (slower): nothing else changes.

    python -c "import rpq_fx._kernels as k; k.main()"    # build now; say what was built, or why not
"""

import hashlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["kernels", "available", "build_error"]

_SOURCE = Path(__file__).parent / "csrc" / "rpq_kernels.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}

# reason: vector width is a compile-time choice; each capability gets its own build, so a cache
# directory shared between machines never hands an AVX-512 build to a CPU without it
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # reason: older torch or a platform without the query: build for the baseline
        return "DEFAULT"


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the PyPI ninja wheel puts it beside the interpreter."""
    if shutil.which("ninja") is None:
        for folder in {Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))}:
            if (folder / "ninja").exists():
                os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
                return


# reason: scripts/asan.sh runs the op tests on an AddressSanitizer build (issue 19); a build of its own
_SANITIZE = {"address": (["-fsanitize=address", "-fno-omit-frame-pointer", "-g"], ["-fsanitize=address"])}


def _sanitizer() -> tuple[list[str], list[str]]:
    """Extra compile and link flags for ``RPQ_FX_SANITIZE`` (only ``address``); none when unset."""
    name = os.environ.get("RPQ_FX_SANITIZE", "")
    if name and name not in _SANITIZE:
        raise ValueError(f"RPQ_FX_SANITIZE must be one of {sorted(_SANITIZE)} or unset, got {name!r}")
    return _SANITIZE.get(name, ([], []))


def _build() -> ModuleType:
    import logging

    # reason: importing cpp_extension logs "No CUDA runtime is found" on a CPU-only machine: noise here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import _get_build_directory, load

    capability = _capability()
    cflags, ldflags = _sanitizer()
    flags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, []), *cflags]
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    name = f"rpq_fx_kernels_{capability.lower()}_{digest}"
    _ninja_on_path()
    if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
        print(f"rpq_fx: building the C++ kernels for {capability} (once per machine, about a minute)",
              file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reason: "No CUDA runtime is found" is noise for a CPU-only build
        return load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp", *ldflags],
                    verbose=False)


def kernels() -> ModuleType | None:
    """The built extension, building it on first call; None where it cannot be built or is turned off."""
    if os.environ.get("RPQ_FX_KERNELS", "").lower() == "torch":
        return None
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # reason: any build failure means: use the stock-op path
                _state["module"], _state["error"] = None, f"{type(error).__name__}: {error}"
                warnings.warn("rpq_fx: the C++ kernels could not be built; the compressed-domain linear runs on "
                              f"stock torch ops (slower). Cause: {str(error).splitlines()[0][:300]}",
                              RuntimeWarning, stacklevel=2)
    return _state["module"]


def available() -> bool:
    return kernels() is not None


def build_error() -> str | None:
    kernels()
    return _state.get("error")


def main() -> None:
    """Build the kernels now (``scripts/setup.sh`` does); exit status 1 if they cannot be built."""
    module = kernels()
    if module is None:
        print(f"rpq_fx C++ kernels: not available ({build_error() or 'RPQ_FX_KERNELS=torch'}); stock torch ops are used")
        sys.exit(1)
    print(f"rpq_fx C++ kernels: built for {_capability()} ({module.__file__})")
