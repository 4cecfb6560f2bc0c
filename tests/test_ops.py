"""Tests of the ``rpq_fx::expand`` custom op against an independent reference.

The reference indexes the codebooks with *unsigned* int64 codes kept by the test itself, so the
op's reading of int16 bit patterns (codes >= 32768) is checked against values it never saw.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rpq_fx.ops  # noqa: F401  (registers torch.ops.rpq_fx.*)
from rpq_fx.ops import expand, expand_backward

FAST = settings(max_examples=60, deadline=None, derandomize=True)


# --------------------------------------------------------------------------- reference helpers

def loop_expand(codebooks: torch.Tensor, ucodes: torch.Tensor) -> torch.Tensor:
    """The formula written out element by element (only for tiny sizes)."""
    groups, _, dim = codebooks.shape
    num_codebooks, num_vectors = ucodes.shape
    out = torch.empty(num_vectors, num_codebooks * dim, dtype=codebooks.dtype)
    for n in range(num_vectors):
        for c in range(num_codebooks):
            g = 0 if groups == 1 else c
            for j in range(dim):
                out[n, c * dim + j] = codebooks[g, int(ucodes[c, n]), j]
    return out


# --------------------------------------------------------------------------- forward values

def test_reference_matches_elementwise_formula(ref):
    codebooks, ucodes, _ = ref.make_case(3, 5, 2, 4, False, torch.float64, 0)
    torch.testing.assert_close(ref.expand(codebooks, ucodes), loop_expand(codebooks, ucodes), rtol=0, atol=0)
    shared_cb, ucodes, _ = ref.make_case(3, 5, 2, 4, True, torch.float64, 1)
    torch.testing.assert_close(ref.expand(shared_cb, ucodes), loop_expand(shared_cb, ucodes), rtol=0, atol=0)


def test_small_exact_example():
    # two codebooks of 3 codewords in R^2, three rows
    codebooks = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]],
                              [[10.0, 11.0], [12.0, 13.0], [14.0, 15.0]]])
    codes = torch.tensor([[2, 0, 1], [0, 0, 2]], dtype=torch.uint8)
    expected = torch.tensor([[4.0, 5.0, 10.0, 11.0],
                             [0.0, 1.0, 10.0, 11.0],
                             [2.0, 3.0, 14.0, 15.0]])
    assert torch.equal(expand(codebooks, codes), expected)
    assert torch.equal(torch.ops.rpq_fx.expand(codebooks, codes), expected)


@FAST
@given(C=st.integers(1, 8), K=st.integers(2, 300), d=st.integers(1, 16), N=st.integers(1, 64),
       shared=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_expand_matches_reference(ref, C, K, d, N, shared, dtype, seed):
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, dtype, seed)
    assert codes.dtype == (torch.uint8 if K <= 256 else torch.int16)
    out = expand(codebooks, codes)
    assert out.shape == (N, C * d)
    assert out.dtype == dtype
    # a gather: the values are copied bit for bit
    torch.testing.assert_close(out, ref.expand(codebooks, ucodes), rtol=0, atol=0)


@FAST
@given(C=st.integers(1, 6), K=st.integers(2, 300), d=st.integers(1, 8), N=st.integers(1, 32),
       shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_expand_noncontiguous_inputs(ref, C, K, d, N, shared, seed):
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float32, seed)
    # same values, strided storage
    cb_nc = codebooks.transpose(1, 2).contiguous().transpose(1, 2)
    codes_nc = codes.t().contiguous().t()
    assert not cb_nc.is_contiguous() or d == 1 or K == 1
    assert not codes_nc.is_contiguous() or C == 1 or N == 1
    torch.testing.assert_close(expand(cb_nc, codes_nc), ref.expand(codebooks, ucodes), rtol=0, atol=0)


@FAST
@given(C=st.integers(1, 8), K=st.integers(2, 300), d=st.integers(1, 16), N=st.integers(1, 64),
       shared=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_expand_grad_matches_reference_autograd(ref, C, K, d, N, shared, dtype, seed):
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, dtype, seed)
    grad_out = torch.randn(N, C * d, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    cb = codebooks.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expand(cb, codes), cb, grad_out)
    cb_ref = codebooks.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ref.expand(cb_ref, ucodes), cb_ref, grad_out)
    assert grad.shape == codebooks.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad, grad_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("K", [32769, 40000, 65535, 65536])
@pytest.mark.parametrize("shared", [False, True])
def test_int16_codes_are_read_unsigned(ref, K, shared):
    C, d, N = 3, 2, 50
    gen = torch.Generator().manual_seed(K)
    codebooks = torch.randn(1 if shared else C, K, d, generator=gen, dtype=torch.float64)
    ucodes = torch.randint(0, K, (C, N), generator=gen)
    # force the extremes: the top code, the first code that is negative as int16, and 0
    ucodes[0, :3] = torch.tensor([K - 1, 32768, 0])
    codes = ref.store_codes(ucodes, K)
    assert codes.dtype == torch.int16
    assert bool((codes < 0).any()), "the case must contain negative int16 bit patterns"
    out = expand(codebooks, codes)
    torch.testing.assert_close(out, ref.expand(codebooks, ucodes), rtol=0, atol=0)
    # and the backward scatters into the same (unsigned) rows
    grad_out = torch.randn(N, C * d, dtype=torch.float64, generator=gen)
    cb = codebooks.clone().requires_grad_()
    (grad,) = torch.autograd.grad(expand(cb, codes), cb, grad_out)
    cb_ref = codebooks.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ref.expand(cb_ref, ucodes), cb_ref, grad_out)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    assert grad[0, K - 1].abs().sum() > 0


# --------------------------------------------------------------------------- autograd

@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("K", [5, 300])
def test_gradcheck_and_gradgradcheck(ref, shared, K):
    C, d, N = 3, 2, 7
    codebooks, _, codes = ref.make_case(C, K, d, N, shared, torch.float64, 123)
    codebooks.requires_grad_()
    fn = lambda cb: expand(cb, codes)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (codebooks,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (codebooks,), eps=1e-6, atol=1e-8)


def test_gradcheck_backward_op(ref):
    C, K, d, N = 3, 4, 2, 6
    _, _, codes = ref.make_case(C, K, d, N, False, torch.float64, 7)
    grad = torch.randn(N, C * d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g: expand_backward(g, codes, C, K), (grad,))


def test_gradient_counts_code_usage(ref):
    """d(sum W)/d codebooks[g, k] = number of times codeword k of group g is used."""
    C, K, d, N = 4, 6, 3, 40
    for shared in (False, True):
        codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float64, 11)
        codebooks.requires_grad_()
        expand(codebooks, codes).sum().backward()
        if shared:
            counts = torch.bincount(ucodes.reshape(-1), minlength=K).view(1, K)
        else:
            counts = torch.stack([torch.bincount(ucodes[c], minlength=K) for c in range(C)])
        expected = counts.to(torch.float64).unsqueeze(-1).expand(-1, -1, d)
        torch.testing.assert_close(codebooks.grad, expected, rtol=0, atol=0)


def test_codes_get_no_gradient(ref):
    codebooks, _, codes = ref.make_case(2, 4, 2, 5, False, torch.float32, 3)
    codebooks.requires_grad_()
    out = expand(codebooks, codes)
    assert out.requires_grad
    assert out.grad_fn is not None
    assert not expand(codebooks.detach(), codes).requires_grad


# --------------------------------------------------------------------------- fake / meta kernel

def test_meta_tensors_give_shape_and_allocate_nothing():
    # a real allocation of this output would need 72 * 10**9 * 128 * 4 bytes (~37 TB)
    codebooks = torch.empty(72, 256, 128, device="meta")
    codes = torch.empty(72, 10**9, dtype=torch.uint8, device="meta")
    out = expand(codebooks, codes)
    assert out.device.type == "meta"
    assert out.shape == (10**9, 72 * 128)
    assert out.dtype == torch.float32
    out64 = expand(torch.empty(1, 65536, 3, device="meta", dtype=torch.float64),
                   torch.empty(5, 11, dtype=torch.int16, device="meta"))
    assert out64.shape == (11, 15) and out64.dtype == torch.float64 and out64.is_meta


def test_meta_backward():
    codebooks = torch.empty(4, 256, 8, device="meta", requires_grad=True)
    codes = torch.empty(4, 10**8, dtype=torch.uint8, device="meta")
    expand(codebooks, codes).sum().backward()
    assert codebooks.grad.is_meta
    assert codebooks.grad.shape == codebooks.shape


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        codebooks = torch.empty(1, 300, 16, dtype=torch.float64)
        codes = torch.empty(6, 10**9, dtype=torch.int16)
        out = expand(codebooks, codes)
        assert out.shape == (10**9, 96)
        assert out.dtype == torch.float64


def test_fake_kernel_checks_ranks():
    with pytest.raises(RuntimeError, match="codebooks must be"):
        expand(torch.empty(256, 8, device="meta"), torch.empty(4, 10, dtype=torch.uint8, device="meta"))
    with pytest.raises(RuntimeError, match="codes must be"):
        expand(torch.empty(4, 256, 8, device="meta"), torch.empty(40, dtype=torch.uint8, device="meta"))


def _opcheck_samples(ref):
    samples = []
    for C, K, d, N, shared, dtype in [(3, 5, 4, 7, False, torch.float64),
                                       (4, 16, 2, 9, True, torch.float32),
                                       (2, 40000, 3, 5, False, torch.float64)]:
        codebooks, _, codes = ref.make_case(C, K, d, N, shared, dtype, C * K)
        samples.append((codebooks.requires_grad_(), codes))
    return samples


@pytest.mark.parametrize("sample", range(3))
def test_opcheck_expand(ref, sample):
    codebooks, codes = _opcheck_samples(ref)[sample]
    result = torch.library.opcheck(torch.ops.rpq_fx.expand.default, (codebooks, codes))
    assert set(result) >= {"test_schema", "test_autograd_registration", "test_faketensor",
                           "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_expand_backward(ref):
    _, _, codes = ref.make_case(3, 5, 4, 7, False, torch.float64, 5)
    grad = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    result = torch.library.opcheck(torch.ops.rpq_fx.expand_backward.default, (grad, codes, 3, 5))
    assert all(v == "SUCCESS" for v in result.values()), result


# --------------------------------------------------------------------------- torch.compile

def test_compile_fullgraph_matches_eager(ref):
    torch._dynamo.reset()
    codebooks, _, codes = ref.make_case(4, 16, 3, 10, False, torch.float32, 21)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))

    def f(cb, codes, x):
        return torch.nn.functional.linear(x, expand(cb, codes)).tanh()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    cb_eager = codebooks.clone().requires_grad_()
    cb_comp = codebooks.clone().requires_grad_()
    out_eager, out_comp = f(cb_eager, codes, x), compiled(cb_comp, codes, x)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.square().sum().backward()
    out_comp.square().sum().backward()
    torch.testing.assert_close(cb_comp.grad, cb_eager.grad)
    assert cb_comp.grad.abs().sum() > 0


# --------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("K,shared", [(256, False), (300, True), (65536, False)])
def test_cuda_matches_cpu(ref, K, shared):
    C, d, N = 4, 8, 33
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float32, K)
    grad_out = torch.randn(N, C * d, generator=torch.Generator().manual_seed(1))
    cb_cpu = codebooks.clone().requires_grad_()
    out_cpu = expand(cb_cpu, codes)
    out_cpu.backward(grad_out)
    cb_gpu = codebooks.cuda().requires_grad_()
    out_gpu = expand(cb_gpu, codes.cuda())
    assert out_gpu.is_cuda
    out_gpu.backward(grad_out.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=0)
    torch.testing.assert_close(cb_gpu.grad.cpu(), cb_cpu.grad)
    torch.testing.assert_close(out_cpu, ref.expand(codebooks, ucodes), rtol=0, atol=0)


def test_reference_codebook_gradient_matches_autograd(ref):
    """conftest's codebook_gradient (for the layer and pass tests) is the expansion's transpose."""
    for shared, K in [(False, 5), (True, 300)]:
        codebooks, ucodes, codes = ref.make_case(3, K, 2, 40, shared, torch.float64, K)
        dense_grad = torch.randn(40, 6, dtype=torch.float64)
        cb = codebooks.clone().requires_grad_()
        (want,) = torch.autograd.grad(ref.expand(cb, ucodes), cb, dense_grad)
        torch.testing.assert_close(ref.codebook_gradient(dense_grad, codes, cb.shape[0], K), want, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (2, 3), ()])
@pytest.mark.parametrize("shared", [False, True])
def test_embedding_output_modified_in_place(ref, shape, shared):
    """rpq_fx::embedding builds its rows with expand; its output is a fresh tensor (not a view of that expansion), so
    callers may modify it in place and still get the right values and codebook gradient."""
    from rpq_fx.ops import embedding

    codebooks, ucodes, codes = ref.make_case(3, 6, 2, 10, shared, torch.float64, len(shape))
    indices = torch.randint(0, 10, shape, generator=torch.Generator().manual_seed(3))
    cb = codebooks.clone().requires_grad_()
    out = embedding(indices, cb, codes)
    out.mul_(3.0)
    (grad,) = torch.autograd.grad(out.square().sum(), cb)
    cb_ref = codebooks.clone().requires_grad_()
    want = torch.nn.functional.embedding(indices, ref.expand(cb_ref, ucodes)) * 3.0
    (grad_ref,) = torch.autograd.grad(want.square().sum(), cb_ref)
    torch.testing.assert_close(out.detach(), want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
