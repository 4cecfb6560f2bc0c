"""The compressed linear kernel's bias, added in its output write, and its input, read in place (issue 23).

``rpq_fx::_linear_compressed(x, codebooks, codes, bias)`` adds the bias where each output is written (no
separate ``add_``) and, for short slices, builds its tables from x where it lies (no copy of x into batch
blocks). Checked against an independent float64 reference (the dense weight built by the test), against the
stock-op kernels, and against the same kernel without the bias followed by ``add_`` (bit for bit: the fold
rounds as ``add_`` does), at odd sizes, every d and K, float32 / bfloat16 / float16, contiguous and not.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpq_fx.ops as ops
from rpq_fx import _kernels
from rpq_fx.ops import linear

pytestmark = pytest.mark.skipif(not _kernels.available(), reason=f"C++ kernels not built: {_kernels.build_error()}")

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
LAYOUTS = ("contiguous", "transposed", "strided", "3d")


def _input(batch: int, features: int, layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``[batch, features]`` values (``[2, ceil(batch / 2), features]`` for "3d") in the given memory layout."""
    if layout == "transposed":
        return torch.randn(features, batch, generator=gen).to(dtype).t()
    if layout == "strided":
        return torch.randn(batch, 2 * features + 1, generator=gen).to(dtype)[:, 1::2]
    if layout == "3d":
        return torch.randn(2, -(-batch // 2), features, generator=gen).to(dtype)
    return torch.randn(batch, features, generator=gen).to(dtype)


def _reference(x, codebooks, ucodes, bias, ref):
    weight = ref.expand(codebooks.double(), ucodes)
    return F.linear(x.double(), weight, None if bias is None else bias.double())


@SETTINGS
@given(batch=st.sampled_from([1, 2, 3, 7, 16, 33, 70, 130]), C=st.integers(1, 40),
       d=st.sampled_from([1, 2, 3, 4, 8, 16, 20]), K=st.sampled_from([3, 16, 33, 256, 300]), N=st.integers(1, 90),
       shared=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_fused_bias_and_in_place_input_match_the_references(ref, batch, C, d, K, N, shared, bias, dtype, layout,
                                                            seed):
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float32, seed)
    codebooks = codebooks.to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = _input(batch, C * d, layout, dtype, gen)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None

    out = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, b)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == dtype and out.is_contiguous()
    # the fold rounds as the kernel's output followed by add_ would: the same bits
    unbiased = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes)
    assert torch.equal(out, unbiased if b is None else unbiased.add_(b))
    with ops.stock_ops():
        stock = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, b)
    expected = _reference(x, codebooks, ucodes, b, ref)
    scale = expected.abs().max().item() + 1e-6
    # float32: the kernels' and the dense product's summation orders; 16-bit floats: one rounding of the products'
    # sums and of the result (8 bits for bfloat16), and (in the stock ops) of the per-codebook tables too
    tol = dict(rtol=1e-4, atol=1e-5 * scale) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(out.double(), stock.double(), **tol)


@pytest.mark.parametrize("d", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("K,shared", [(16, True), (256, True), (33, False)])
@pytest.mark.parametrize("layout", ["transposed", "3d"])
def test_linear_forward_and_backward_with_bias_on_non_contiguous_input(ref, d, K, shared, layout):
    """``rpq_fx::linear`` on the compressed path: output and gradients of x, codebooks and bias against the dense
    float64 reference, at a batch of 33 rows (one full block of 32 and a tail of one)."""
    C, N = 7, 45
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float32, d * 1000 + K)
    gen = torch.Generator().manual_seed(d + K)
    x = _input(33 if layout != "3d" else 66, C * d, layout, torch.float32, gen)
    b = torch.randn(N, generator=gen)
    grad_out = torch.randn(*x.shape[:-1], N, generator=gen)

    leaves = [t.detach().clone().requires_grad_() for t in (x, codebooks, b)]
    out = linear(leaves[0], leaves[1], codes, leaves[2], "compressed")
    out.backward(grad_out)
    dense = [t.detach().double().requires_grad_() for t in (x, codebooks, b)]
    expected = F.linear(dense[0], ref.expand(dense[1], ucodes), dense[2])
    expected.backward(grad_out.double())
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-4, atol=1e-5 * scale)
    for got, want in zip(leaves, dense):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5 * want.grad.abs().max().item())


@pytest.mark.parametrize("d,K,shared", [(4, 16, True), (3, 5, False), (16, 7, True)])
def test_gradcheck_with_bias_and_a_transposed_input(d, K, shared, ref):
    codebooks, _, codes = ref.make_case(3, K, d, 11, shared, torch.float64, 7)
    x = torch.randn(3 * d, 33, dtype=torch.float64).t().requires_grad_()
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    codebooks.requires_grad_()
    # reason: fast mode (random projections of the Jacobians) needs a few calls where the full check needs one per
    # input value, and each call of a busy machine's parallel regions can wait milliseconds
    assert torch.autograd.gradcheck(lambda x, cb, b: linear(x, cb, codes, b, "compressed"), (x, codebooks, b),
                                    fast_mode=True)


def test_the_kernel_checks_the_bias_it_reads():
    codebooks, codes, x = torch.randn(1, 16, 4), torch.zeros(8, 30, dtype=torch.uint8), torch.randn(5, 32)
    with pytest.raises(RuntimeError, match=r"bias must be \[30\]"):
        torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, torch.randn(29))
    with pytest.raises(RuntimeError, match=r"bias must be \[30\]"):
        torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, torch.randn(1, 30))
    with pytest.raises(RuntimeError, match="different devices"):
        linear(x, codebooks, codes, torch.randn(30, device="meta"), "compressed")
    # a bias of another dtype is added after the product, as add_ would
    wide = torch.randn(30, dtype=torch.float64)
    out = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, wide)
    assert torch.equal(out, torch.ops.rpq_fx._linear_compressed(x, codebooks, codes).add_(wide))


@pytest.mark.parametrize("C,d", [(384, 4), (96, 4), (1024, 2), (50, 8), (20, 5), (64, 16)])
@pytest.mark.parametrize("K,shared", [(256, True), (300, False)])
def test_expand_of_wide_rows_matches_the_reference(ref, C, d, K, shared):
    """The expansion reads each row's codes in place, however many slices a row has: every value against the
    test's own indexing (uint8 and int16 codes, shared and per-slice codebooks, odd row counts)."""
    codebooks, ucodes, codes = ref.make_case(C, K, d, 131, shared, torch.float32, C + d)
    assert torch.equal(ops.expand(codebooks, codes), ref.expand(codebooks, ucodes))


# ------------------------------------------------------------------ the batched kernel's threads
# Batches of 3 or more rows share their tasks (a batch block and a band of rows) among the threads of an
# at::parallel_for region; every output is computed by one task, whichever thread runs it.


@pytest.mark.skipif((torch.multiprocessing.cpu_count() or 1) < 2, reason="one CPU: nothing to share")
@pytest.mark.parametrize("d", [1, 2, 4, 8, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_batched_kernel_on_two_threads_is_bit_identical_to_one(ref, d, dtype):
    """The bits of one thread on two, at batches of every block width, bias folded, odd sizes."""
    C, N = 37, 301  # K = 16: bands of 64-128 rows, so even a one-block batch is several tasks
    codebooks, ucodes, codes = ref.make_case(C, 16, d, N, True, torch.float32, d)
    codebooks = codebooks.to(dtype)
    bias = torch.randn(N).to(dtype)
    threads = torch.get_num_threads()
    try:
        for batch in (3, 8, 16, 33, 70):
            x = torch.randn(batch, C * d, generator=torch.Generator().manual_seed(batch)).to(dtype)
            torch.set_num_threads(1)
            alone = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, bias)
            torch.set_num_threads(2)
            shared = torch.ops.rpq_fx._linear_compressed(x, codebooks, codes, bias)
            assert torch.equal(alone, shared)
            expected = _reference(x, codebooks, ucodes, bias, ref)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(shared.double(), expected, rtol=tol * 10, atol=tol * expected.abs().max().item())
    finally:
        torch.set_num_threads(threads)
