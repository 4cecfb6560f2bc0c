"""The compressed-domain ops ``rpq_fx::linear`` and ``rpq_fx::embedding`` against independent references.

The reference builds the dense weight with its own indexing (unsigned int64 codes kept by the test)
and calls ``F.linear`` / ``F.embedding``. Both ways of computing a linear layer (``path="compressed"``,
which never builds the weight, and ``path="expand"``) and both implementations of the compressed one
(the C++ kernels and the stock-op fallback, :func:`rpq_fx.ops.stock_ops`) are checked.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LargestTensor
import rpq_fx.ops as ops
from rpq_fx import _kernels
from rpq_fx.ops import library, policy
from rpq_fx.ops import choose_path, embedding, linear, linear_backward

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                # reason: the backend fixture only picks the kernels, the same for every example
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- reference helpers

def tolerances(dtype, reference: torch.Tensor) -> dict:
    """Summation order differs from a dense matmul: float32 agrees to ~1e-6 relative."""
    scale = max(reference.abs().max().item(), 1e-12) if reference.numel() else 1.0
    return dict(rtol=1e-10, atol=1e-10 * scale) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5 * scale)


def grads(fn, *tensors, grad_out):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in tensors]


# --------------------------------------------------------------------------- linear: values and gradients

@FAST
@given(C=st.integers(1, 6), K=st.integers(2, 300), d=st.integers(1, 9), N=st.integers(1, 40),
       batch=st.sampled_from([(), (0,), (1,), (3,), (2, 5), (8,), (17,), (40,), (130,)]),
       shared=st.booleans(), bias=st.booleans(), path=st.sampled_from(["compressed", "expand"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_linear_matches_reference(ref, backend, C, K, d, N, batch, shared, bias, path, dtype, seed):
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*batch, C * d, generator=gen, dtype=dtype)
    b = torch.randn(N, generator=gen, dtype=dtype) if bias else None
    grad_out = torch.randn(*batch, N, generator=gen, dtype=dtype)
    tensors = (x, codebooks) + ((b,) if bias else ())

    def ours(x, cb, b=None):
        return linear(x, cb, codes, b, path)

    def reference(x, cb, b=None):
        return F.linear(x, ref.expand(cb, ucodes), b)

    out, got = grads(ours, *tensors, grad_out=grad_out)
    expected, want = grads(reference, *tensors, grad_out=grad_out)
    assert out.shape == (*batch, N) and out.dtype == dtype
    if expected.numel():
        torch.testing.assert_close(out, expected, **tolerances(dtype, expected))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerances(dtype, w))


@pytest.mark.parametrize("path", ["compressed", "expand"])
@pytest.mark.parametrize("K", [256, 40000])
def test_int16_codes_are_read_unsigned(ref, backend, path, K):
    C, d, N = 3, 2, 20
    codebooks, ucodes, _ = ref.make_case(C, K, d, N, False, torch.float64, K)
    ucodes[0, :3] = torch.tensor([K - 1, min(32768, K - 2), 0])
    codes = ref.store_codes(ucodes, K)
    assert codes.dtype == (torch.uint8 if K <= 256 else torch.int16)
    assert K <= 256 or bool((codes < 0).any())
    x = torch.randn(33, C * d, dtype=torch.float64)
    grad_out = torch.randn(33, N, dtype=torch.float64)
    out, (gx, gcb) = grads(lambda x, cb: linear(x, cb, codes, None, path), x, codebooks, grad_out=grad_out)
    expected, (rx, rcb) = grads(lambda x, cb: F.linear(x, ref.expand(cb, ucodes)), x, codebooks, grad_out=grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gcb, rcb)


@pytest.mark.parametrize("path", ["compressed", "expand"])
@pytest.mark.parametrize("shared,K", [(False, 5), (True, 5), (False, 300)])
def test_gradcheck_and_gradgradcheck(ref, backend, path, shared, K):
    C, d, N = 3, 2, 4
    codebooks, _, codes = ref.make_case(C, K, d, N, shared, torch.float64, 7)
    x = torch.randn(2, 3, C * d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, dtype=torch.float64, requires_grad=True)
    codebooks.requires_grad_()

    def fn(x, cb, b):
        return linear(x, cb, codes, b, path)

    fast = K > 256  # reason: 1800 codebook values; a random-projection check keeps it to seconds
    assert torch.autograd.gradcheck(fn, (x, codebooks, b), fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, (x, codebooks, b), fast_mode=fast)


def test_backward_op_gradcheck(ref, backend):
    C, K, d, N = 2, 4, 3, 5
    codebooks, _, codes = ref.make_case(C, K, d, N, False, torch.float64, 3)
    grad = torch.randn(4, N, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, C * d, dtype=torch.float64, requires_grad=True)
    codebooks.requires_grad_()
    for path in ("compressed", "expand"):
        assert torch.autograd.gradcheck(
            lambda g, x, cb: linear_backward(g, x, cb, codes, True, True, path), (grad, x, codebooks))


def test_paths_agree_on_a_realistic_layer(ref, backend):
    """A ViT-B-sized layer in float32: the two paths give the same output and gradients."""
    codebooks, _, codes = ref.make_case(12, 256, 64, 768, False, torch.float32, 0)
    x = torch.randn(70, 768)
    grad_out = torch.randn(70, 768)
    out_c, grads_c = grads(lambda x, cb: linear(x, cb, codes, None, "compressed"), x, codebooks, grad_out=grad_out)
    out_e, grads_e = grads(lambda x, cb: linear(x, cb, codes, None, "expand"), x, codebooks, grad_out=grad_out)
    torch.testing.assert_close(out_c, out_e, **tolerances(torch.float32, out_e))
    for g, w in zip(grads_c, grads_e):
        torch.testing.assert_close(g, w, **tolerances(torch.float32, w))


@pytest.mark.parametrize("shared,bias", [(False, True), (True, False)])
def test_expand_path_in_row_blocks_matches_reference(ref, backend, monkeypatch, shared, bias):
    """The expand path builds the weight a block of rows at a time; force many small blocks."""
    monkeypatch.setattr(library, "_EXPAND_BLOCK_BYTES", 64)  # 64-row blocks
    C, K, d, N = 3, 20, 4, 200
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float64, 9)
    assert len(library._row_blocks(N, C * d, 8)) == 4
    x = torch.randn(2, 5, C * d, dtype=torch.float64)
    b = torch.randn(N, dtype=torch.float64) if bias else None
    grad_out = torch.randn(2, 5, N, dtype=torch.float64)
    tensors = (x, codebooks) + ((b,) if bias else ())
    out, got = grads(lambda x, cb, b=None: linear(x, cb, codes, b, "expand"), *tensors, grad_out=grad_out)
    expected, want = grads(lambda x, cb, b=None: F.linear(x, ref.expand(cb, ucodes), b), *tensors, grad_out=grad_out)
    torch.testing.assert_close(out, expected)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    fn = lambda x, cb: linear(x, cb, codes, None, "expand")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x[:1, :2].clone().requires_grad_(), codebooks.clone().requires_grad_()),
                                        fast_mode=True)


@pytest.mark.parametrize("path", ["compressed", "expand"])
def test_output_is_not_a_view_and_can_be_modified_in_place(ref, backend, path):
    codebooks, _, codes = ref.make_case(2, 8, 4, 6, False, torch.float32, 1)
    codebooks.requires_grad_()
    for shape in [(5, 8), (2, 3, 8), (8,)]:
        y = linear(torch.randn(shape), codebooks, codes, torch.randn(6), path)
        assert not y._is_view()
        y.mul_(2)  # an autograd error if the op returned a view
        y.sum().backward()
    assert codebooks.grad.abs().sum() > 0


def test_codes_get_no_gradient_and_inputs_without_grad_are_skipped(ref, backend):
    codebooks, _, codes = ref.make_case(2, 8, 4, 6, False, torch.float64, 2)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    for path in ("compressed", "expand"):
        out = linear(x, codebooks, codes, None, path)  # codebooks frozen
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.shape == x.shape
        cb = codebooks.clone().requires_grad_()
        out = linear(x.detach(), cb, codes, None, path)  # input frozen
        (gcb,) = torch.autograd.grad(out.sum(), cb)
        assert gcb.shape == cb.shape


# --------------------------------------------------------------------------- no dense weight on the compressed path

def _largest_operand(fn) -> int:
    """The largest tensor read by any aten op while ``fn`` runs, inside custom ops and C++ kernels too."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    sizes = [torch.Size(shape).numel() for event in prof.events() for shape in (event.input_shapes or [])
             if isinstance(shape, list) and all(isinstance(s, int) for s in shape)]
    return max(sizes)


def test_compressed_path_never_builds_the_weight(ref, backend):
    N, C, d = 2048, 8, 64  # W would be 2048 x 512 = 1M values
    codebooks, _, codes = ref.make_case(C, 256, d, N, False, torch.float32, 0)
    codebooks.requires_grad_()
    x = torch.randn(4, C * d, requires_grad=True)
    largest = _largest_operand(lambda: linear(x, codebooks, codes, None, "compressed").sum().backward())
    assert largest == codebooks.numel(), largest  # the codebooks are the biggest thing it reads
    largest = _largest_operand(lambda: linear(x, codebooks, codes, None, "expand").sum().backward())
    assert largest == N * C * d  # the expand path does build the weight


@pytest.mark.parametrize("path", ["compressed", "expand"])
def test_backward_keeps_no_dense_weight(ref, backend, path):
    """Saved for backward: the input, the codebooks and the codes, never the weight (checkpointing is free)."""
    N, C, d = 1024, 4, 32
    codebooks, _, codes = ref.make_case(C, 256, d, N, False, torch.float32, 0)
    codebooks.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = linear(torch.randn(3, C * d, requires_grad=True), codebooks, codes, None, path)
    assert sorted(saved) == sorted([torch.Size([3, C * d]), codebooks.shape, codes.shape])
    out.sum().backward()


# --------------------------------------------------------------------------- the per-call choice

def test_path_argument_and_compute_path_force_the_choice(ref):
    codebooks, _, codes = ref.make_case(16, 256, 256, 4096, False, torch.float32, 0)
    x = torch.randn(8, 4096)
    assert choose_path(x, codebooks, codes, "expand") == "expand"
    assert choose_path(x, codebooks, codes, "compressed") == "compressed"
    with ops.compute_path("expand"):
        assert choose_path(x, codebooks, codes) == "expand"
        assert choose_path(x, codebooks, codes, "compressed") == "compressed"  # an explicit argument wins
    with pytest.raises(ValueError, match="bogus"):
        with ops.compute_path("bogus"):
            choose_path(x, codebooks, codes)
    with pytest.raises(ValueError, match="path must be one of"):
        linear(x[:1, :8], codebooks[:1, :4, :8], codes[:1, :5], None, "fastest")


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_auto_prefers_compressed_for_rpq_and_pq_forward_and_expand_for_large_pq_batches_elsewhere(ref, monkeypatch, kernels):
    monkeypatch.setattr(policy, "_fast_kernels_apply", lambda x, cb: kernels == "cpp")
    rpq = ref.make_case(16, 256, 256, 4096, False, torch.float32, 0)[::2]  # RPQ: d = 256
    pq = ref.make_case(512, 256, 8, 4096, True, torch.float32, 0)[::2]  # PQ: d = 8, one shared codebook
    for batch in (1, 8, 64, 512):
        x = torch.empty(batch, 4096)
        assert choose_path(x, *rpq) == "compressed"
        assert choose_path(x, *rpq, backward=True) == "compressed"
    x = torch.empty(512, 4096)
    # issue 23: the cache-blocked C++ forward was timed faster than expand-then-matmul at batch 512 too (d = 8)
    assert choose_path(x, *pq) == ("compressed" if kernels == "cpp" else "expand")
    assert choose_path(x, *pq, backward=True) == "expand"
    assert choose_path(torch.empty(1, 4096), *pq) == "compressed"


# --------------------------------------------------------------------------- fake / meta, opcheck, compile

def test_meta_shapes_allocate_nothing():
    codebooks = torch.empty(72, 256, 128, device="meta", requires_grad=True)
    codes = torch.empty(72, 10**6, dtype=torch.uint8, device="meta")
    x = torch.empty(3, 5, 72 * 128, device="meta", requires_grad=True)
    out = linear(x, codebooks, codes, torch.empty(10**6, device="meta"))
    assert out.is_meta and out.shape == (3, 5, 10**6)
    out.sum().backward()
    assert codebooks.grad.is_meta and codebooks.grad.shape == codebooks.shape
    assert x.grad.shape == x.shape
    rows = embedding(torch.empty(4, 7, dtype=torch.int64, device="meta"), codebooks, codes, 0)
    assert rows.is_meta and rows.shape == (4, 7, 72 * 128)


def test_fake_kernels_check_shapes():
    codebooks = torch.empty(4, 256, 8, device="meta")
    codes = torch.empty(4, 100, dtype=torch.uint8, device="meta")
    with pytest.raises(RuntimeError, match="features"):
        linear(torch.empty(2, 31, device="meta"), codebooks, codes)
    with pytest.raises(RuntimeError, match="bias must be"):
        linear(torch.empty(2, 32, device="meta"), codebooks, codes, torch.empty(99, device="meta"))
    with pytest.raises(RuntimeError, match="codebooks for 4 slices"):
        linear(torch.empty(2, 32, device="meta"), torch.empty(2, 256, 8, device="meta"), codes)
    with pytest.raises(RuntimeError, match="padding_idx"):
        embedding(torch.empty(3, dtype=torch.int64, device="meta"), codebooks, codes, 100)


@pytest.mark.parametrize("path", ["compressed", "expand"])
def test_opcheck(ref, backend, path):
    codebooks, _, codes = ref.make_case(3, 5, 4, 7, False, torch.float64, 5)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    for args in [(x, codebooks.requires_grad_(), codes, bias, path), (x, codebooks, codes, None, path)]:
        result = torch.library.opcheck(torch.ops.rpq_fx.linear.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    grad = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    result = torch.library.opcheck(torch.ops.rpq_fx.linear_backward.default,
                                   (grad, x, codebooks, codes, True, True, path))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_embedding(ref):
    codebooks, _, codes = ref.make_case(3, 300, 4, 9, False, torch.float64, 5)
    indices = torch.randint(0, 9, (2, 5))
    for args in [(indices, codebooks.requires_grad_(), codes, None, False), (indices, codebooks, codes, -2, True)]:
        result = torch.library.opcheck(torch.ops.rpq_fx.embedding.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_compile_fullgraph_matches_eager(ref, backend):
    torch._dynamo.reset()
    codebooks, _, codes = ref.make_case(4, 16, 3, 10, False, torch.float32, 21)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 10, (2, 3))

    def f(cb, x, tokens):
        return linear(x, cb, codes, None).tanh().sum() + embedding(tokens, cb, codes).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    cb_eager, cb_comp = codebooks.clone().requires_grad_(), codebooks.clone().requires_grad_()
    out_eager, out_comp = f(cb_eager, x, tokens), compiled(cb_comp, x, tokens)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.backward()
    out_comp.backward()
    torch.testing.assert_close(cb_comp.grad, cb_eager.grad)


# --------------------------------------------------------------------------- embedding

@FAST
@given(C=st.integers(1, 5), K=st.integers(2, 300), d=st.integers(1, 6), N=st.integers(1, 50),
       shape=st.sampled_from([(0,), (1,), (7,), (3, 4), (2, 1, 5)]), shared=st.booleans(),
       padding=st.one_of(st.none(), st.integers(-50, 49)), scale=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_embedding_matches_reference(ref, C, K, d, N, shape, shared, padding, scale, dtype, seed):
    if padding is not None and not -N <= padding < N:
        padding = None
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    indices = torch.randint(0, N, shape, generator=gen)
    if padding is not None and indices.numel():
        indices.view(-1)[::2] = padding % N
    grad_out = torch.randn(*shape, C * d, generator=gen, dtype=dtype)
    out, (g,) = grads(lambda cb: embedding(indices, cb, codes, padding, scale), codebooks, grad_out=grad_out)
    expected, (r,) = grads(lambda cb: F.embedding(indices, ref.expand(cb, ucodes), padding, scale_grad_by_freq=scale),
                      codebooks, grad_out=grad_out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a gather: bit for bit
    torch.testing.assert_close(g, r, **tolerances(dtype, r))


def test_embedding_expands_only_the_looked_up_rows(ref):
    codebooks, _, codes = ref.make_case(8, 256, 16, 50000, False, torch.float32, 0)
    codebooks.requires_grad_()
    tokens = torch.randint(0, 50000, (2, 6))
    with LargestTensor() as mode:
        out = embedding(tokens, codebooks, codes)
        out.sum().backward()
    assert out.shape == (2, 6, 128)
    assert mode.largest <= codebooks.numel()  # nothing of the 50000 x 128 table, only rows and codebook grads
    largest = _largest_operand(lambda: embedding(tokens, codebooks, codes).sum().backward())
    assert largest <= max(codebooks.numel(), codes.numel())  # the codes are read, never the table
    assert not out._is_view()
    out.detach().add_(1)


def test_embedding_gradcheck(ref):
    codebooks, _, codes = ref.make_case(3, 5, 2, 7, True, torch.float64, 1)
    codebooks.requires_grad_()
    indices = torch.tensor([[0, 6, 6], [2, 3, 0]])
    assert torch.autograd.gradcheck(lambda cb: embedding(indices, cb, codes), (codebooks,))
    assert torch.autograd.gradgradcheck(lambda cb: embedding(indices, cb, codes, 6, True), (codebooks,))


def test_embedding_index_out_of_range_raises(ref):
    codebooks, _, codes = ref.make_case(2, 4, 2, 5, False, torch.float32, 0)
    with pytest.raises((IndexError, RuntimeError)):
        embedding(torch.tensor([5]), codebooks, codes)


# --------------------------------------------------------------------------- expand: the C++ copy and the stock gather

@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("K,shared", [(256, False), (256, True), (40000, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_expand_backends_match_reference(ref, backend, d, K, shared, dtype):
    C, N = 5, 130
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float64, d * K)
    codebooks = codebooks.to(dtype)
    out = ops.expand(codebooks, codes)
    assert out.shape == (N, C * d) and out.dtype == dtype and not out.is_meta
    torch.testing.assert_close(out, ref.expand(codebooks, ucodes), rtol=0, atol=0)
    grad_w = torch.randn(N, C * d, dtype=torch.float64).to(dtype)
    (got,) = torch.autograd.grad(ops.expand(codebooks.requires_grad_(), codes), codebooks, grad_w)
    (want,) = torch.autograd.grad(ref.expand(codebooks, ucodes), codebooks, grad_w)
    torch.testing.assert_close(got, want, **tolerances(torch.float64, want)) if dtype == torch.float64 else \
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2 * want.abs().max().item())


# --------------------------------------------------------------------------- small-d kernels (issue 23)

@pytest.mark.parametrize("d", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [16, 32, 256])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.skipif(not _kernels.available(), reason="the C++ kernels' blocking and SIMD paths")
def test_small_d_layers_whose_table_spans_many_cache_blocks(ref, d, K, shared):
    """Product-quantization shapes: enough slices that the forward's table is built and consumed in several
    slice blocks (256 KiB each) and in several bands of rows, batches that take every block width (1 row: the
    AVX-512 permute path for K <= 32, the gather path above), odd row counts that leave SIMD tails; forward and
    backward against the dense reference."""
    C, N = 300 if K == 256 and shared else 40, 203
    codebooks, ucodes, codes = ref.make_case(C, K, d, N, shared, torch.float32, 100 * d + K)
    for batch in (1, 3, 8, 33):
        x = torch.randn(batch, C * d)
        grad_out = torch.randn(batch, N)
        out, got = grads(lambda x, cb: linear(x, cb, codes, None, "compressed"), x, codebooks, grad_out=grad_out)
        expected, want = grads(lambda x, cb: F.linear(x, ref.expand(cb, ucodes)), x, codebooks, grad_out=grad_out)
        torch.testing.assert_close(out, expected, **tolerances(torch.float32, expected))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tolerances(torch.float32, w))
