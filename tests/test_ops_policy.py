"""The path policy's overrides (issue 20 item 3): ``RPQ_FX_PATH`` read once at import, ``compute_path``
for a block of code (the backward of a forward run inside it too), and the kernels reached by device."""

import os
import subprocess
import sys

import pytest
import torch

import rpq_fx.ops as ops
from rpq_fx import _kernels
from rpq_fx.ops import policy


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _case():
    codebooks = torch.randn(16, 256, 256)
    codes = torch.randint(0, 256, (16, 4096), dtype=torch.uint8)
    return torch.randn(1, 4096), codebooks, codes


def test_rpq_fx_path_is_read_once_at_import():
    code = ("import os, torch, rpq_fx.ops as ops\n"
            "x, cb, codes = torch.randn(1, 4096), torch.randn(16, 256, 256), torch.zeros(16, 4096, dtype=torch.uint8)\n"
            "first = ops.choose_path(x, cb, codes)\n"
            "os.environ['RPQ_FX_PATH'] = 'compressed'\n"
            "print(first, ops.choose_path(x, cb, codes))\n")
    done = _run(code, RPQ_FX_PATH="expand")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["expand", "expand"]  # set at import; a change later is not read per call
    bad = _run("import rpq_fx.ops", RPQ_FX_PATH="fastest")
    assert bad.returncode != 0
    assert "RPQ_FX_PATH must be one of ('auto', 'compressed', 'expand', 'lut8', 'lut16'), got 'fastest'" in bad.stderr


def test_compute_path_forces_auto_calls_in_its_block_and_nests():
    x, codebooks, codes = _case()
    assert ops.choose_path(x, codebooks, codes) == "compressed"  # the cost model's pick for an RPQ layer
    with ops.compute_path("expand"):
        assert ops.choose_path(x, codebooks, codes) == "expand"
        with ops.compute_path("auto"):
            assert ops.choose_path(x, codebooks, codes) == "compressed"
        assert ops.choose_path(x, codebooks, codes) == "expand"
        assert ops.choose_path(x, codebooks, codes, "compressed") == "compressed"
    assert ops.choose_path(x, codebooks, codes) == "compressed"
    with pytest.raises(ValueError, match="compute_path must be one of"):
        with ops.compute_path("fast"):
            pass
    assert ops.choose_path(x, codebooks, codes) == "compressed"


def test_a_backward_follows_the_path_its_forward_was_forced_to(monkeypatch):
    chosen = []
    real = policy.choose_path

    def spy(input, codebooks, codes, path="auto", backward=False):
        chosen.append((backward, real(input, codebooks, codes, path, backward)))
        return chosen[-1][1]

    monkeypatch.setattr("rpq_fx.ops.library.choose_path", spy)
    x, codebooks, codes = _case()
    codebooks.requires_grad_()
    with ops.compute_path("expand"):
        out = ops.linear(x, codebooks, codes)
    out.sum().backward()  # outside the block
    assert chosen == [(False, "expand"), (True, "expand")]


@pytest.mark.skipif(not _kernels.available(), reason=f"C++ kernels not built: {_kernels.build_error()}")
def test_cpu_calls_reach_the_cpp_kernels_through_the_dispatcher():
    def cpu_kernel(name):
        table = torch._C._dispatch_dump_table(f"rpq_fx::{name}")
        return next(line for line in table.splitlines() if line.startswith("CPU:"))

    names = ["expand", "_expand_backward_add", "_linear_compressed", "_linear_compressed_backward", "_nearest"]
    assert all("rpq_kernels.cpp" in cpu_kernel(name) for name in names)
    with ops.stock_ops():
        assert not _kernels.serving()
        assert all("library.py" in cpu_kernel(name) for name in names[:4])
    assert _kernels.serving() and all("rpq_kernels.cpp" in cpu_kernel(name) for name in names)


def test_turned_off_at_import_runs_stock_ops():
    code = ("import torch, rpq_fx.ops as ops\nfrom rpq_fx import _kernels\n"
            "t = torch._C._dispatch_dump_table('rpq_fx::expand')\n"
            "print(_kernels.available(), 'rpq_kernels.cpp' in t)\n"
            "print(ops.expand(torch.arange(8.).view(1, 2, 4), torch.tensor([[1, 0]], dtype=torch.uint8)).tolist())")
    done = _run(code, RPQ_FX_KERNELS="torch")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False False", "[[4.0, 5.0, 6.0, 7.0], [0.0, 1.0, 2.0, 3.0]]"]


@pytest.mark.skipif(not _kernels.available(), reason="the cost model of the C++ kernels")
def test_fitted_small_d_layers_run_compressed_where_it_was_timed_faster():
    """Issue 23: after the cache-blocked forward, the float32 compressed path beat expand-then-matmul (and dense) at
    every batch up to 128 for one shared codebook of d = 2, 4, 8 (4096x4096, benchmarks/linear.py); d = 1 at a
    large batch is a dense matmul's work in lookups, and expands."""
    for d in (2, 4, 8):
        codebooks, codes = torch.zeros(1, 256, d), torch.zeros(4096 // d, 4096, dtype=torch.uint8)
        for batch in (1, 2, 8, 16, 32, 64, 128):
            assert ops.choose_path(torch.zeros(batch, 4096), codebooks, codes) == "compressed", (d, batch)
    codebooks, codes = torch.zeros(1, 256, 1), torch.zeros(4096, 4096, dtype=torch.uint8)
    assert ops.choose_path(torch.zeros(1, 4096), codebooks, codes) == "compressed"
    assert ops.choose_path(torch.zeros(512, 4096), codebooks, codes) == "expand"


@pytest.mark.skipif(not _kernels.available(), reason="the cost model of the C++ kernels")
def test_the_cached_choice_follows_the_kernels_and_the_threads():
    """choose_path caches the cost model's answer per call shape: a change of what computes the call (stock ops in
    ``stock_ops``) or of the thread count must still reach the model, not a stale answer."""
    x, codebooks, codes = torch.zeros(16, 384), torch.zeros(1, 16, 1), torch.zeros(384, 384, dtype=torch.uint8)
    assert ops.choose_path(x, codebooks, codes) == "compressed"  # the C++ lookups
    with ops.stock_ops():
        assert ops.choose_path(x, codebooks, codes) == "expand"  # a stock gather of d = 1 loses to the GEMM
    assert ops.choose_path(x, codebooks, codes) == "compressed"
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for batch, d in ((1, 4), (2, 4), (64, 4), (128, 4), (512, 1)):
                x, codebooks = torch.zeros(batch, 384), torch.zeros(1, 256, d)
                codes = torch.zeros(384 // d, 1536, dtype=torch.uint8)
                args = (batch, 384, 1536, 384 // d, 256, d, torch.float32, "cpu", True, False, n, policy._lut_max_rows())
                want = "compressed" if policy._cost_ns("compressed", *args) <= policy._cost_ns("expand", *args) \
                    else "expand"
                assert ops.choose_path(x, codebooks, codes) == want, (n, batch, d)
    finally:
        torch.set_num_threads(threads)
