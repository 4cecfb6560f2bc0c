"""How the C++ kernels are built and found (issue 19 item 8, issue 20 item 4).

A build is keyed by everything its binary depends on, so two checkouts or virtual environments
never rebuild each other's; it goes into the virtual environment; a build says so once; a machine
without a compiler runs on stock ops and says why.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from rpq_fx import _kernels


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernels state of its own (restored afterwards), building into ``tmp_path``."""
    monkeypatch.setattr(_kernels, "_state", {})
    monkeypatch.setenv("RPQ_FX_KERNELS_DIR", str(tmp_path))
    monkeypatch.delenv("RPQ_FX_KERNELS", raising=False)
    return tmp_path


def test_the_build_name_keys_source_torch_compiler_and_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(_kernels, "_compiler", lambda: "g++ (Debian 12.2.0-14) 12.2.0")
    base = _kernels._build_spec()[0]
    assert base == _kernels._build_spec()[0]  # deterministic
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert _kernels._build_spec()[0] != base
    monkeypatch.undo()
    monkeypatch.setattr(_kernels, "_compiler", lambda: "clang version 19.0.0")
    assert _kernels._build_spec()[0] != base
    monkeypatch.setattr(_kernels, "_compiler", lambda: "g++ (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setenv("RPQ_FX_SANITIZE", "address")
    name, cflags, ldflags = _kernels._build_spec()
    assert name != base and "-fsanitize=address" in cflags and "-fsanitize=address" in ldflags
    monkeypatch.delenv("RPQ_FX_SANITIZE")
    other = tmp_path / "other.cpp"
    other.write_bytes(_kernels._SOURCE.read_bytes() + b"\n// another checkout\n")
    monkeypatch.setattr(_kernels, "_SOURCE", other)
    assert _kernels._build_spec()[0] != base


def test_builds_go_into_the_virtual_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RPQ_FX_KERNELS_DIR", raising=False)
    if sys.prefix != sys.base_prefix:
        assert _kernels._build_root().is_relative_to(sys.prefix)
    monkeypatch.setenv("RPQ_FX_KERNELS_DIR", str(tmp_path))
    assert _kernels._build_root() == tmp_path


def test_a_bad_sanitizer_name_is_refused(monkeypatch):
    monkeypatch.setenv("RPQ_FX_SANITIZE", "adress")
    with pytest.raises(ValueError, match="RPQ_FX_SANITIZE must be one of \\['address'\\]"):
        _kernels._sanitizer()


def test_without_a_compiler_stock_ops_run_and_status_says_why(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-rpq")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _kernels.load() is None
    assert not _kernels.available() and _kernels.kernels() is None
    assert "no C++ compiler: 'no-such-compiler-rpq' is not on PATH" in _kernels.build_error()
    assert _kernels.status().startswith("stock torch ops (C++ kernels not available: RuntimeError: no C++ compiler")
    assert not list(fresh.iterdir())  # nothing was attempted


def test_turned_off_says_so(fresh, monkeypatch):
    monkeypatch.setenv("RPQ_FX_KERNELS", "torch")
    assert _kernels.load() is None and _kernels.kernels() is None and _kernels.build_error() is None
    assert _kernels.status() == "stock torch ops (C++ kernels not available: turned off by RPQ_FX_KERNELS=torch)"


def test_a_build_says_so_once(fresh, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension

    built = []

    def fake_load(name, build_directory, is_python_module, **kwargs):
        assert not is_python_module  # the kernels register with the dispatcher; no Python module
        built.append(build_directory)
        return f"{build_directory}/{name}.so"

    monkeypatch.setattr(_kernels, "_compiler", lambda: "g++ test")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    first = _kernels.load()
    assert _kernels.load() == first and len(built) == 1 and _kernels.serving()
    with _kernels.suspended():
        assert _kernels.available() and not _kernels.serving()
    err = capsys.readouterr().err
    assert err.count("rpq_fx: building the C++ kernels") == 1 and str(fresh) in err
    assert _kernels.status().startswith("C++ kernels for ")


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_stale_build_lock_is_cleared_and_a_live_one_kept(tmp_path, capsys):
    """A killed build leaves torch's FileBaton ``lock`` behind, and the next load would wait on it forever."""
    lock, owner = tmp_path / "lock", tmp_path / "lock.owner"
    lock.touch()
    owner.write_text(str(_dead_pid()))
    _kernels._clear_stale_lock(tmp_path)
    assert not lock.exists() and not owner.exists()
    assert "removing the stale build lock" in capsys.readouterr().err

    lock.touch()
    owner.write_text(str(os.getpid()))  # its builder runs: the build waits for it
    _kernels._clear_stale_lock(tmp_path)
    assert lock.exists() and owner.exists()

    owner.unlink()  # no record (an older rpq_fx built): cleared only once it is old
    _kernels._clear_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - _kernels._STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    _kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()


@pytest.mark.parametrize("baton", [True, False])
def test_a_load_after_a_killed_build_does_not_wait_on_its_lock(fresh, monkeypatch, baton):
    """Where torch locks with FileBaton, a dead builder's lock is cleared before the build; where it holds an OS lock
    on the file (released when its holder dies), the file is left alone: a live builder may hold it."""
    import torch.utils.cpp_extension as cpp_extension

    if baton:
        monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)
    else:
        monkeypatch.delattr(cpp_extension, "FileBaton", raising=False)
    name = _kernels._build_spec()[0]
    folder = fresh / name
    folder.mkdir()
    (folder / "lock").touch()
    (folder / "lock.owner").write_text(str(_dead_pid()))
    seen = {}

    def fake_build(**kwargs):  # reason: a real build takes a minute; torch's would wait while `lock` exists
        seen["lock"] = (folder / "lock").exists()
        seen["owner"] = (folder / "lock.owner").read_text()
        return str(folder / f"{name}.so")

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    assert _kernels._build() == str(folder / f"{name}.so")
    if baton:
        assert seen == {"lock": False, "owner": str(os.getpid())}
        assert not (folder / "lock.owner").exists()  # removed once the build is done
    else:
        assert seen["lock"] and (folder / "lock").exists()
