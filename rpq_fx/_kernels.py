"""The optional C++ kernels of rpq_fx (``csrc/rpq_kernels.cpp``): how they are built, found and loaded.

The kernels register themselves with the dispatcher as the CPU implementations of the ``rpq_fx``
ops (``TORCH_LIBRARY_IMPL``), so loading them is all it takes: ``torch.ops.rpq_fx.*`` then reaches
them for CPU tensors. :mod:`rpq_fx.ops` loads them when it is imported.

One build per (source, torch version, compiler, flags, CPU capability): the build's name is a hash
of all of them, so two checkouts or two virtual environments never rebuild each other's kernels.
Builds go into the virtual environment (``<venv>/var/rpq_fx-kernels``; ``~/.cache/rpq_fx-kernels``
outside one; ``RPQ_FX_KERNELS_DIR`` overrides). ``scripts/setup.sh`` builds them at set-up; a load
that must build says so once on stderr (gcc and ninja: about a minute). Where they cannot be
built, or with ``RPQ_FX_KERNELS=torch`` at import, rpq_fx computes the same thing with stock torch
ops (slower); :func:`status` says which, and why.

    python -c "import rpq_fx._kernels as k; k.main()"    # build now; say what was built, or why not
"""

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from contextlib import contextmanager
from types import SimpleNamespace

import torch

__all__ = ["load", "available", "serving", "suspended", "kernels", "build_error", "status"]

_SOURCE = Path(__file__).parent / "csrc" / "rpq_kernels.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}

# reason: vector width is a compile-time choice; each capability gets its own build, so a cache
# directory shared between machines never hands an AVX-512 build to a CPU without it
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# reason: scripts/asan.sh runs the op tests on an AddressSanitizer build (issue 19); a build of its own
_SANITIZE = {"address": (["-fsanitize=address", "-fno-omit-frame-pointer", "-g"], ["-fsanitize=address"])}


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # reason: older torch or a platform without the query: build for the baseline
        return "DEFAULT"


def _sanitizer() -> tuple[list[str], list[str]]:
    """Extra compile and link flags for ``RPQ_FX_SANITIZE`` (only ``address``); none when unset."""
    name = os.environ.get("RPQ_FX_SANITIZE", "")
    if name and name not in _SANITIZE:
        raise ValueError(f"RPQ_FX_SANITIZE must be one of {sorted(_SANITIZE)} or unset, got {name!r}")
    return _SANITIZE.get(name, ([], []))


def _compiler() -> str:
    """The first line of ``$CXX --version`` (torch builds with ``$CXX``, default ``c++``); raises if there is none."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX)")
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.partition("\n")[0]


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the PyPI ninja wheel puts it beside the interpreter."""
    if shutil.which("ninja") is None:
        for folder in {Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))}:
            if (folder / "ninja").exists():
                os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
                return


def _build_root() -> Path:
    """Where builds go: ``RPQ_FX_KERNELS_DIR``, else inside the virtual environment, else the user's cache."""
    if os.environ.get("RPQ_FX_KERNELS_DIR"):
        return Path(os.environ["RPQ_FX_KERNELS_DIR"])
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "var" / "rpq_fx-kernels"
    return Path.home() / ".cache" / "rpq_fx-kernels"


def _build_spec() -> tuple[str, list[str], list[str]]:
    """``(name, cflags, ldflags)``: the name hashes everything the binary depends on."""
    capability = _capability()
    cflags, ldflags = _sanitizer()
    cflags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, []), *cflags]
    ldflags = ["-fopenmp", *ldflags]
    key = "\0".join([torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag,
                     _compiler(), *cflags, *ldflags]).encode()
    digest = hashlib.sha256(_SOURCE.read_bytes() + key).hexdigest()[:12]
    return f"rpq_fx_kernels_{capability.lower()}_{digest}", cflags, ldflags


# reason: torch builds that lock with FileBaton (cpp_extension.load) wait forever, polling, while the build folder
# holds a `lock` file, and a build that was killed leaves it behind: the next `import rpq_fx` hung at 0% CPU. Where
# torch does, we record the building process's id beside it and clear a lock whose builder is gone (or, with no
# record, one older than this). Newer torch (2.14 here) holds an OS advisory lock on that file instead, released when
# its holder dies; the file stays between builds and must not be removed (a live builder may hold it).
_STALE_LOCK_S = 300.0


def _lock_is_a_baton() -> bool:
    """Whether torch's extension builder locks with FileBaton (the lock file's mere existence blocks)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # reason: another user's live process
        return True
    return True


def _clear_stale_lock(folder: Path) -> None:
    """Remove ``folder/lock`` left by a killed build: its recorded builder (``lock.owner``) is no longer running, or,
    with no record, it is older than ``_STALE_LOCK_S``. A lock whose builder runs is left alone (the build waits)."""
    lock, owner = folder / "lock", folder / "lock.owner"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    try:
        pid = int(owner.read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if (pid is not None and _alive(pid)) or (pid is None and age < _STALE_LOCK_S):
        return
    why = f"its build (process {pid}) is not running" if pid is not None else f"it is {age:.0f} s old"
    print(f"rpq_fx: removing the stale build lock {lock} ({why}; a build was interrupted)", file=sys.stderr,
          flush=True)
    lock.unlink(missing_ok=True)
    owner.unlink(missing_ok=True)


def _build() -> str:
    """Build (if needed) and load the kernels into the dispatcher; the shared library's path."""
    import logging

    # reason: importing cpp_extension logs "No CUDA runtime is found" on a CPU-only machine: noise here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load as build_and_load

    name, cflags, ldflags = _build_spec()
    folder = _build_root() / name
    folder.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    if not (folder / f"{name}.so").exists():
        print(f"rpq_fx: building the C++ kernels for {_capability()} into {folder} (once per torch version and "
              "source, about a minute)", file=sys.stderr, flush=True)
    owner = folder / "lock.owner"
    if _lock_is_a_baton():
        _clear_stale_lock(folder)
        if not (folder / "lock").exists():
            owner.write_text(str(os.getpid()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reason: "No CUDA runtime is found" is noise for a CPU-only build
            return build_and_load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags, extra_ldflags=ldflags,
                                  build_directory=str(folder), is_python_module=False, verbose=False)
    finally:
        if owner.exists() and owner.read_text().strip() == str(os.getpid()):
            owner.unlink(missing_ok=True)


def _turned_off() -> bool:
    return os.environ.get("RPQ_FX_KERNELS", "").lower() == "torch"


def load() -> str | None:
    """Load the kernels (building them first if needed), once; their path, or None where they cannot be
    built or ``RPQ_FX_KERNELS=torch`` turns them off."""
    if "path" in _state:
        return _state["path"]
    with _lock:
        if "path" not in _state:
            if _turned_off():
                _state["path"] = None
                return None
            try:
                _state["path"] = _build()
            except Exception as error:  # reason: any build failure means: use the stock-op path
                _state["path"], _state["error"] = None, f"{type(error).__name__}: {error}"
                warnings.warn("rpq_fx: the C++ kernels could not be built; rpq_fx runs on stock torch ops "
                              f"(slower). Cause: {str(error).splitlines()[0][:300]}", RuntimeWarning, stacklevel=2)
    return _state["path"]


def available() -> bool:
    """Whether the kernels are loaded (they stay registered for the life of the process)."""
    return _state.get("path") is not None


def serving() -> bool:
    """Whether CPU calls reach the C++ kernels now: loaded, and not :func:`suspended`."""
    return _state.get("path") is not None and not _state.get("suspended", 0)


@contextmanager
def suspended():
    """Marks the kernels as not serving (``rpq_fx.ops.stock_ops`` registers stock kernels over them)."""
    _state["suspended"] = _state.get("suspended", 0) + 1
    try:
        yield
    finally:
        _state["suspended"] -= 1


def kernels() -> SimpleNamespace | None:
    """The kernels that have no op of their own in :mod:`rpq_fx.ops` (``nearest``, the k-means assignment),
    or None where the kernels are not loaded or ``RPQ_FX_KERNELS=torch`` is set now."""
    if _turned_off() or load() is None:
        return None
    return SimpleNamespace(nearest=torch.ops.rpq_fx._nearest.default, __file__=_state["path"])


def build_error() -> str | None:
    """Why the kernels could not be built (None if they were, or were turned off)."""
    load()
    return _state.get("error")


def status() -> str:
    """One line for a report: which kernels compute, and where they came from or why not."""
    path = load()
    if path is not None:
        return f"C++ kernels for {_capability()} ({path})"
    reason = build_error() or "turned off by RPQ_FX_KERNELS=torch"
    return f"stock torch ops (C++ kernels not available: {reason.splitlines()[0][:300]})"


def main() -> None:
    """Build the kernels now (``scripts/setup.sh`` does); exit status 1 if they cannot be built."""
    print(f"rpq_fx: {status()}")
    if not available():
        sys.exit(1)
