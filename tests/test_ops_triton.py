"""The Triton kernels of ``rpq_fx.ops.triton``: their registration, the fallback to stock ops, the status
line and the CUDA path rule here; the kernels themselves in ``tests/ops_triton_cases.py``, run in a fresh
process (through Triton's interpreter where there is no GPU, which only works where Triton itself is
imported under it: the rest of the suite imports Triton first).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from rpq_fx import _triton  # noqa: E402
from rpq_fx.ops import policy, stock  # noqa: E402

_ROOT = Path(__file__).parent.parent


def test_kernels_against_the_dense_reference_in_a_fresh_process():
    """Every kernel, forward and backward, fp32/fp16/bf16, odd sizes, K = 16 and 256, d = 1..256."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}  # reason: may hold -n
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-m", "pytest", str(_ROOT / "tests" / "ops_triton_cases.py"), "-q", "-x",
                           "-p", "no:cacheprovider", "-p", "no:xdist"],
                          env=env, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_registered_for_cuda_through_the_dispatcher():
    for op in ("expand", "embedding", "_expand_backward_add", "_linear_compressed", "_linear_compressed_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rpq_fx::{op}", "CUDA"), op


def test_stock_kernels_compute_where_triton_cannot(monkeypatch):
    """Triton missing (or a dtype it does not take, or deterministic algorithms asked for where it would add
    with atomics): the registered functions compute with the stock kernels, and the status line says why."""
    from rpq_fx.ops.triton import cuda, expand, linear

    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(2, 16, 4, generator=g, dtype=torch.float64)
    codes = torch.randint(0, 16, (2, 10), generator=g, dtype=torch.uint8)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    calls = []
    for module, name in [(linear, "linear"), (linear, "linear_backward"), (expand, "expand_rows"),
                         (expand, "scatter_rows")]:
        monkeypatch.setattr(module, name, lambda *args, name=name: calls.append(name))
    assert torch.equal(cuda.linear_compressed(x, codebooks, codes), stock.linear_compressed(x, codebooks, codes))
    assert not calls, "float64 went to a Triton kernel"
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the scatters' atomics sum in no fixed order: stock kernels
    try:
        grad = torch.randn(3, 10, generator=g)
        cuda.linear_compressed_backward(grad.float(), x.float(), codebooks.float(), codes, True, True)
        cuda.expand_backward_add(torch.zeros(2, 16, 4), torch.randn(10, 8, generator=g), codes)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert not calls, "Triton atomics ran under torch.use_deterministic_algorithms(True)"
    monkeypatch.setitem(_triton._state, "reason", "triton cannot be imported (ModuleNotFoundError: triton)")
    codebooks, x = codebooks.float(), x.float()
    assert torch.equal(cuda.expand(codebooks, codes), stock.expand(codebooks, codes))
    rows = torch.tensor([[2, 9]])
    assert torch.equal(cuda.embedding(rows, codebooks, codes), stock.expand(codebooks, codes)[rows])
    assert torch.equal(cuda.linear_compressed(x, codebooks, codes), stock.linear_compressed(x, codebooks, codes))
    grad = torch.randn(3, 10, generator=g)
    for got, want in zip(cuda.linear_compressed_backward(grad, x, codebooks, codes, True, True),
                         stock.linear_compressed_backward(grad, x, codebooks, codes, True, True)):
        assert torch.equal(got, want)
    out = torch.zeros_like(codebooks)
    cuda.expand_backward_add(out, stock.expand(codebooks, codes), codes)
    assert out.abs().sum() > 0
    assert not calls, f"Triton kernels {calls} ran where Triton is said to be missing"
    assert _triton.status() == ("stock torch ops (Triton kernels not available: triton cannot be imported "
                                "(ModuleNotFoundError: triton))")


def test_status_names_triton_and_the_off_switch(monkeypatch):
    import triton

    assert _triton.status().startswith(f"Triton {triton.__version__} kernels")
    monkeypatch.setenv("RPQ_FX_KERNELS", "torch")
    assert _triton._probe() == "turned off by RPQ_FX_KERNELS=torch"


def test_cuda_path_rule():
    """On CUDA with the Triton kernels, compressed up to 256 rows, expand above (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        codebooks = torch.empty(4, 256, 16, device="cuda")
        codes = torch.empty(4, 512, dtype=torch.uint8, device="cuda")
        for batch, path in [(1, "compressed"), (256, "compressed"), (257, "expand")]:
            x = torch.empty(batch, 64, device="cuda")
            assert policy.choose_path(x, codebooks, codes) == path
            assert policy.choose_path(x, codebooks, codes, backward=True) == path
        assert policy.choose_path(torch.empty(1, 64, device="cuda"), codebooks, codes, "expand") == "expand"


def test_report_says_what_computes_on_cuda(monkeypatch):
    import rpq_fx
    from torch import nn

    gm = rpq_fx.convert(nn.Sequential(nn.Linear(64, 512)), num_codebooks=8)
    monkeypatch.setitem(_triton._state, "reason", "turned off by RPQ_FX_KERNELS=torch")
    rep = rpq_fx.report(gm)
    line = "compute on CUDA: stock torch ops (Triton kernels not available: turned off by RPQ_FX_KERNELS=torch)"
    assert rep.totals["cuda_kernels"] == line.removeprefix("compute on CUDA: ")
    assert str(rep).splitlines()[-2] == line and str(rep).splitlines()[-1].startswith("compute: ")


def test_gpu_benchmark_without_cuda_says_so_and_writes_nothing(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rpq_fx_benchmark_gpu", _ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.md"
    with pytest.raises(SystemExit) as info:
        gpu.main(["--out", str(out)])
    assert "needs a CUDA GPU" in str(info.value.code) and "nothing was timed or written" in str(info.value.code)
    assert not out.exists()


class _Launches:
    """Stands in for a ``@triton.jit`` kernel: records each launch's arguments instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((self.kernel, args, meta))


def test_every_kernel_compiles_for_a_gpu(monkeypatch):
    """Each launch the launchers make (as on CUDA tensors: bfloat16 tiles multiplied as bfloat16), compiled
    ahead of time to a cubin for an H100 (sm_90) with Triton's own ptxas: no GPU needed, and it catches
    what the interpreter lets through."""
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    from rpq_fx.ops.triton import expand, linear

    calls = []
    for module in (expand, linear):
        for name, kernel in vars(module).copy().items():
            if isinstance(kernel, JITFunction) and name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Launches(kernel, calls))
    monkeypatch.setattr(linear, "_upcast", lambda x: False)  # reason: as on a GPU (the CPU tensors here would upcast)
    # d = 128: each tile within one slice (WHOLE) in every kernel
    for dtype, shared, d in [(torch.bfloat16, False, 8), (torch.float32, False, 8), (torch.float16, True, 8),
                             (torch.bfloat16, False, 128)]:
        codebooks = torch.randn(1 if shared else 3, 16, d, dtype=dtype)
        codes = torch.randint(0, 16, (3, 40), dtype=torch.uint8)
        expand.expand_rows(codebooks, codes)
        expand.expand_rows(codebooks, codes, torch.tensor([1, 2]))
        expand.scatter_rows(torch.zeros_like(codebooks), torch.randn(40, 3 * d, dtype=dtype), codes)
        batch = 20 if d == 128 else 5  # blocks of 32 rows and of 16
        x, grad = torch.randn(batch, 3 * d, dtype=dtype), torch.randn(batch, 40, dtype=dtype)
        for method in linear.METHODS:
            linear.linear(x, codebooks, codes, method)
            linear.linear_backward(grad, x, codebooks, codes, True, True, method)
    compiled = set()
    for kernel, args, meta in calls:
        signature = {name: mangle_type(arg) for name, arg in zip([n for n in kernel.arg_names if n not in meta], args)}
        key = (kernel.fn.__name__, *sorted(signature.items()), *sorted((k, repr(v)) for k, v in meta.items()))
        if key not in compiled:
            compiled.add(key)
            source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(meta, "constexpr")}, constexprs=meta)
            assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"], key
    assert {dict(key[1:])["WHOLE"] for key in compiled if "_lut" not in key[0]} == {"True", "False"}
    assert {key[0] for key in compiled} == {"_expand_kernel", "_scatter_kernel", "_lut_table_kernel",
                                            "_lut_gather_kernel", "_lut_scatter_kernel", "_fused_forward_kernel",
                                            "_fused_grad_input_kernel", "_fused_grad_codebooks_kernel"}
