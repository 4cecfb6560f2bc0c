"""The Triton kernels (``rpq_fx.ops.triton``) against a dense float64 reference built from the decompressed
weight: on CUDA tensors where a GPU is at hand, else on the CPU through Triton's interpreter.

Not collected by the suite on its own: ``tests/test_ops_triton.py`` runs this file in a fresh process
(with ``TRITON_INTERPRET=1`` set from the start where there is no GPU: the interpreter only works where
Triton itself was imported under it, and the rest of the suite imports Triton first). By hand:

    TRITON_INTERPRET=1 python -m pytest tests/ops_triton_cases.py -q

The dispatcher routes only CUDA tensors to these kernels, so the tests call the launchers and the
registered functions (``rpq_fx.ops.triton.cuda``) directly.
"""

from types import SimpleNamespace

import pytest
import torch
import triton
from hypothesis import given, settings, strategies as st

from rpq_fx.ops import stock

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}

if not GPU and type(triton.language.zeros).__name__ != "InterpretedFunction":
    raise RuntimeError("no GPU, and Triton was imported without its interpreter: set TRITON_INTERPRET=1 before "
                       "python starts (see this file's docstring)")


@pytest.fixture(scope="module")
def kern():
    from rpq_fx.ops.triton import cuda, expand, linear

    return SimpleNamespace(expand=expand, linear=linear, cuda=cuda)


def _weight(C, K, d, N, shared, dtype, seed=0, code_dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(1 if shared else C, K, d, generator=g).to(dtype)
    high = min(K, 256) if code_dtype == torch.uint8 else K
    codes = torch.randint(0, high, (C, N), generator=g, dtype=torch.int32)
    if code_dtype == torch.int16:
        codes = torch.where(codes > 32767, codes - 65536, codes)  # int16 bit patterns, read unsigned
    return codebooks.to(DEVICE), codes.to(code_dtype).to(DEVICE)


def _close(actual, expected, dtype):
    """Within a few units of ``dtype``'s rounding of the largest reference value."""
    tol = _TOL[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol * scale)


def _dense_linear(x, codebooks, codes, grad):
    """Output and gradients of ``x W^T`` with W decompressed (float64, autograd)."""
    x64 = x.double().detach().requires_grad_()
    cb64 = codebooks.double().detach().requires_grad_()
    y = x64 @ stock.expand(cb64, codes).t()
    y.backward(grad.double())
    return y.detach(), x64.grad, cb64.grad


# --------------------------------------------------------------------------- expand, embedding rows, scatter

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C,K,d,shared", [(3, 16, 1, False), (2, 256, 5, True), (4, 16, 64, False),
                                           (2, 256, 256, False), (130, 16, 3, True)])
def test_expand_is_the_stock_gather(kern, dtype, C, K, d, shared):
    codebooks, codes = _weight(C, K, d, 37, shared, dtype)
    assert torch.equal(kern.expand.expand_rows(codebooks, codes), stock.expand(codebooks, codes))


def test_expand_reads_strided_codes_and_int16_codes_above_32767(kern):
    codebooks, codes = _weight(3, 16, 4, 70, False, torch.float32)
    view = codes[:, 5:48]  # a block of rows, as the expand path of rpq_fx::linear passes
    assert not view.is_contiguous()
    assert torch.equal(kern.expand.expand_rows(codebooks, view), stock.expand(codebooks, view))
    codebooks, codes = _weight(2, 65536, 2, 50, True, torch.float16, code_dtype=torch.int16)
    assert bool((codes < 0).any()), "no code above 32767: the unsigned read is untested"
    assert torch.equal(kern.expand.expand_rows(codebooks, codes), stock.expand(codebooks, codes))


@pytest.mark.parametrize("dtype,d", [(torch.float32, 3), (torch.bfloat16, 128)])
def test_expand_rows_builds_only_the_rows_asked_for(kern, dtype, d):
    codebooks, codes = _weight(4, 16, d, 29, False, dtype)
    rows = torch.tensor([28, 0, 5, 5, 17], device=DEVICE)
    assert torch.equal(kern.expand.expand_rows(codebooks, codes, rows), stock.expand(codebooks, codes)[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,K,d,shared", [(3, 16, 1, True), (2, 256, 7, False), (4, 16, 64, True),
                                           (2, 16, 128, False)])
def test_scatter_rows_sums_each_slice_into_its_codeword(kern, dtype, C, K, d, shared):
    codebooks, codes = _weight(C, K, d, 45, shared, dtype)
    grad = torch.randn(45, C * d, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    cb64 = codebooks.double().requires_grad_()
    stock.expand(cb64, codes).backward(grad.double())
    out = torch.ones_like(codebooks)  # added into, not overwritten
    kern.expand.scatter_rows(out, grad, codes)
    _close(out, cb64.grad + 1, dtype)


# --------------------------------------------------------------------------- linear, both methods


@pytest.mark.parametrize("method", ["lut", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C,K,d,shared,batch", [(3, 16, 1, True, 3), (2, 256, 8, False, 1), (5, 16, 3, False, 21),
                                                 (2, 16, 64, True, 5), (1, 256, 256, False, 2)])
def test_linear_forward_and_backward_match_the_dense_reference(kern, method, dtype, C, K, d, shared, batch):
    codebooks, codes = _weight(C, K, d, 37, shared, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, C * d, generator=g).to(dtype).to(DEVICE)
    grad = torch.randn(batch, 37, generator=g).to(dtype).to(DEVICE)
    y_ref, gx_ref, gcb_ref = _dense_linear(x, codebooks, codes, grad)
    y = kern.linear.linear(x, codebooks, codes, method)
    assert y.dtype == dtype and y.shape == (batch, 37)
    _close(y, y_ref, dtype)
    gx, gcb = kern.linear.linear_backward(grad, x, codebooks, codes, True, True, method)
    assert gx.dtype == gcb.dtype == dtype
    _close(gx, gx_ref, dtype)
    _close(gcb, gcb_ref, dtype)


@pytest.mark.parametrize("method", ["lut", "fused"])
def test_linear_backward_computes_only_what_is_asked(kern, method):
    codebooks, codes = _weight(2, 16, 4, 33, False, torch.float32)
    x = torch.randn(2, 3, 8, device=DEVICE)  # leading dims flattened, as rpq_fx::linear passes them
    grad = torch.randn(2, 3, 33, device=DEVICE)
    _, gx_ref, gcb_ref = _dense_linear(x.reshape(6, 8), codebooks, codes, grad.reshape(6, 33))
    assert kern.linear.linear(x, codebooks, codes, method).shape == (2, 3, 33)
    gx, gcb = kern.linear.linear_backward(grad, x, codebooks, codes, True, False, method)
    assert gx.shape == x.shape and gcb.numel() == 0
    _close(gx.reshape(6, 8), gx_ref, torch.float32)
    gx, gcb = kern.linear.linear_backward(grad, x, codebooks, codes, False, True, method)
    assert gx.numel() == 0
    _close(gcb, gcb_ref, torch.float32)


@pytest.mark.parametrize("method", ["lut", "fused"])
def test_reductions_split_over_programs_add_up(kern, monkeypatch, method):
    """A GEMV has too few output tiles to fill a GPU: the reduction is split into parts whose partial sums
    are added after (the interpreter asks for 8 programs, so these small shapes split too)."""
    parts = []

    def split(tiles, steps, device, split=kern.linear._split):
        parts.append(split(tiles, steps, device)[0])
        return split(tiles, steps, device)

    monkeypatch.setattr(kern.linear, "_split", split)
    codebooks, codes = _weight(4, 16, 32, 200, False, torch.float16)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)
    grad = torch.randn(2, 200, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    y_ref, gx_ref, _ = _dense_linear(x, codebooks, codes, grad)
    _close(kern.linear.linear(x, codebooks, codes, method), y_ref, torch.float16)
    _close(kern.linear.linear_backward(grad, x, codebooks, codes, True, False, method)[0], gx_ref, torch.float16)
    assert parts and max(parts) > 1 and (GPU or min(parts[:2 if method == "fused" else 1]) > 1), parts


@settings(max_examples=12, deadline=None)
@given(C=st.integers(1, 6), d=st.integers(1, 40), K=st.sampled_from([16, 256]), shared=st.booleans(),
       N=st.integers(1, 80), batch=st.integers(1, 40), method=st.sampled_from([None, "lut", "fused"]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_linear_property(kern, C, d, K, shared, N, batch, method, dtype, seed):
    codebooks, codes = _weight(C, K, d, N, shared, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, C * d, generator=g).to(dtype).to(DEVICE)
    grad = torch.randn(batch, N, generator=g).to(dtype).to(DEVICE)
    y_ref, gx_ref, gcb_ref = _dense_linear(x, codebooks, codes, grad)
    _close(kern.linear.linear(x, codebooks, codes, method), y_ref, dtype)
    gx, gcb = kern.linear.linear_backward(grad, x, codebooks, codes, True, True, method)
    _close(gx, gx_ref, dtype)
    _close(gcb, gcb_ref, dtype)


def test_lookup_tables_for_a_few_rows_and_the_fused_gemm_above(kern):
    assert kern.linear.lut_applies(1, 4) and kern.linear.lut_applies(16, 64)
    assert not kern.linear.lut_applies(17, 64) and not kern.linear.lut_applies(8, 4)
    with pytest.raises(ValueError, match="method"):
        kern.linear.linear(torch.zeros(1, 4, device=DEVICE), *_weight(1, 16, 4, 3, False, torch.float32), "dense")


def test_empty_batches(kern):
    codebooks, codes = _weight(2, 16, 4, 9, False, torch.float32)
    x = torch.zeros(0, 8, device=DEVICE)
    assert kern.linear.linear(x, codebooks, codes).shape == (0, 9)
    gx, gcb = kern.linear.linear_backward(torch.zeros(0, 9, device=DEVICE), x, codebooks, codes, True, True)
    assert gx.shape == (0, 8) and torch.equal(gcb, torch.zeros_like(codebooks))



# --------------------------------------------------------------------------- the registered (CUDA) functions

def test_registered_functions_compute_what_the_stock_kernels_do(kern):
    codebooks, codes = _weight(3, 16, 4, 40, False, torch.float32)
    x = torch.randn(5, 12, device=DEVICE)
    grad = torch.randn(5, 40, device=DEVICE)
    assert torch.equal(kern.cuda.expand(codebooks, codes), stock.expand(codebooks, codes))
    _close(kern.cuda.linear_compressed(x, codebooks, codes), stock.linear_compressed(x, codebooks, codes),
           torch.float32)
    bias = torch.randn(40, device=DEVICE)
    _close(kern.cuda.linear_compressed(x, codebooks, codes, bias), stock.linear_compressed(x, codebooks, codes) + bias,
           torch.float32)
    for got, want in zip(kern.cuda.linear_compressed_backward(grad, x, codebooks, codes, True, True),
                         stock.linear_compressed_backward(grad, x, codebooks, codes, True, True)):
        _close(got, want, torch.float32)
    indices = torch.tensor([[3, 39], [0, 3]], device=DEVICE)
    assert torch.equal(kern.cuda.embedding(indices, codebooks, codes), stock.expand(codebooks, codes)[indices])
    out, ref = torch.zeros_like(codebooks), torch.zeros_like(codebooks)
    kern.cuda.expand_backward_add(out, stock.expand(codebooks, codes), codes)
    stock.expand_backward_add(ref, stock.expand(codebooks, codes), codes)
    _close(out, ref, torch.float32)


def test_registered_functions_refuse_bad_codes_and_indices(kern):
    codebooks, codes = _weight(2, 16, 4, 10, False, torch.float32)
    codes[1, 7] = 20
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(IndexError, match="rpq_fx expand: code 20 is out of range for 16"):
        kern.cuda.expand(codebooks, codes)
    with pytest.raises(IndexError, match="rpq_fx linear: code 20"):
        kern.cuda.linear_compressed(x, codebooks, codes)
    with pytest.raises(IndexError, match="rpq_fx linear_backward: code 20"):
        kern.cuda.linear_compressed_backward(torch.zeros(2, 10, device=DEVICE), x, codebooks, codes, True, True)
    with pytest.raises(IndexError, match="rpq_fx embedding: code 20"):
        kern.cuda.embedding(torch.tensor([7], device=DEVICE), codebooks, codes)
    assert kern.cuda.embedding(torch.tensor([6], device=DEVICE), codebooks, codes).shape == (1, 8)  # row 7 unread
    with pytest.raises(IndexError, match="rpq_fx embedding: index 10 is out of range for 10 rows"):
        kern.cuda.embedding(torch.tensor([10], device=DEVICE), codebooks, codes)


if GPU:  # reason: only a GPU has CUDA tensors for the dispatcher to route; defined there only, never skipped

    @pytest.mark.parametrize("path", ["compressed", "expand"])
    def test_the_ops_on_cuda_reach_the_triton_kernels(kern, monkeypatch, path):
        """rpq_fx::linear / embedding / hot_embedding on CUDA tensors, through the dispatcher, against the
        dense reference; the Triton launchers are seen to run."""
        from rpq_fx.ops import compute_path, embedding, hot_embedding, linear

        seen = set()
        for module, name in [(kern.linear, "linear"), (kern.linear, "linear_backward"), (kern.expand, "expand_rows"),
                             (kern.expand, "scatter_rows")]:
            def spy(*args, fn=getattr(module, name), name=name, **kwargs):
                seen.add(name)
                return fn(*args, **kwargs)
            monkeypatch.setattr(module, name, spy)
        codebooks, codes = _weight(4, 256, 32, 300, False, torch.bfloat16)
        codebooks.requires_grad_()
        x = torch.randn(3, 7, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(3, 7, 300, device=DEVICE, dtype=torch.bfloat16)
        y_ref, gx_ref, gcb_ref = _dense_linear(x.reshape(21, 128), codebooks, codes, grad.reshape(21, 300))
        with compute_path(path):
            y = linear(x, codebooks, codes)
            y.backward(grad)
        _close(y.reshape(21, 300), y_ref, torch.bfloat16)
        _close(x.grad.reshape(21, 128), gx_ref, torch.bfloat16)
        _close(codebooks.grad, gcb_ref, torch.bfloat16)
        assert seen == ({"linear", "linear_backward"} if path == "compressed" else {"expand_rows", "scatter_rows"})
        indices = torch.tensor([[5, 299, 5]], device=DEVICE)
        assert torch.equal(embedding(indices, codebooks, codes), stock.expand(codebooks.detach(), codes)[indices])
        hot_cb, hot_codes = _weight(128 // 4, 16, 4, 2, True, torch.bfloat16)
        hot_index = torch.tensor([299, 7], device=DEVICE, dtype=torch.int32)
        rows = hot_embedding(indices, hot_cb, hot_codes, hot_index, 300)
        hot = stock.expand(hot_cb, hot_codes)
        assert torch.equal(rows[0, 1], hot[0]) and not rows[0, 0].any()
