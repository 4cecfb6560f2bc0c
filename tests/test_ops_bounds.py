"""No input to a direct op call can make a kernel read or write outside its buffers (issue 19).

Every op, on both the C++ kernels and the stock-op path, rejects codes that are not below the
number of codewords (uint8 with K < 256, int16 read as unsigned), codes of another dtype, shapes
that do not fit together and indices out of range, with an error that names the op and the value.
"""

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpq_fx.ops as ops
from conftest import BACKENDS
from rpq_fx import _kernels

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                # reason: the backend fixture only picks the kernels, the same for every example
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _stored(value: int, num_codes: int) -> int:
    """An unsigned code as the int16 bit pattern the op reads, for K > 256."""
    return value - 65536 if num_codes > 256 and value >= 32768 else value


def _codes_with(bad: int, C: int, N: int, K: int, where: tuple[int, int], seed: int) -> torch.Tensor:
    """Valid codes ``[C, N]`` for K codewords, one of them (at ``where``) set to ``bad``."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.uint8 if K <= 256 else torch.int16
    valid = torch.randint(0, min(K, 32768), (C, N), generator=gen)
    codes = valid.to(dtype)
    codes[where] = _stored(bad, K)
    return codes


def _calls(codebooks: torch.Tensor, codes: torch.Tensor, row: int) -> dict:
    """Every entry point that reads codes, each reading row ``row`` of the weight."""
    C, N = codes.shape
    G, K, d = codebooks.shape
    x = torch.randn(3, C * d, dtype=codebooks.dtype)
    grad_y = torch.randn(3, N, dtype=codebooks.dtype)
    grad_w = torch.randn(N, C * d, dtype=codebooks.dtype)
    return {
        "expand": lambda: torch.ops.rpq_fx.expand(codebooks, codes),
        "expand_backward": lambda: torch.ops.rpq_fx.expand_backward(grad_w, codes, G, K),
        "expand autograd": lambda: ops.expand(codebooks.clone().requires_grad_(), codes).sum().backward(),
        **{f"linear {path}": (lambda path=path: torch.ops.rpq_fx.linear(x, codebooks, codes, None, path))
           for path in ("compressed", "expand")},
        **{f"linear_backward {path}": (lambda path=path: torch.ops.rpq_fx.linear_backward(
            grad_y, x, codebooks, codes, True, True, path)) for path in ("compressed", "expand")},
        "embedding": lambda: torch.ops.rpq_fx.embedding(torch.tensor([row, 0]), codebooks, codes),
        "hot_embedding": lambda: ops.hot_embedding(torch.tensor([[row + 1]]), codebooks, codes,
                                                   torch.arange(1, N + 1, dtype=torch.int32), N + 1),
    }


@st.composite
def bad_cases(draw):
    K = draw(st.one_of(st.integers(1, 255), st.integers(257, 65535)))
    capacity = 256 if K <= 256 else 65536
    bad = draw(st.one_of(st.just(K), st.just(capacity - 1), st.integers(K, capacity - 1)))
    C, N, d = draw(st.integers(1, 5)), draw(st.integers(1, 40)), draw(st.integers(1, 6))
    where = (draw(st.integers(0, C - 1)), draw(st.integers(0, N - 1)))
    return dict(K=K, bad=bad, C=C, N=N, d=d, where=where, shared=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**16)))


OPS = sorted(_calls(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.uint8), 0))


@FAST
@given(case=bad_cases(), op=st.sampled_from(OPS))
def test_every_op_rejects_codes_out_of_range(backend, case, op):
    K, C, N = case["K"], case["C"], case["N"]
    codes = _codes_with(case["bad"], C, N, K, case["where"], case["seed"])
    codebooks = torch.randn(1 if case["shared"] else C, K, case["d"], dtype=case["dtype"])
    with pytest.raises(IndexError, match=rf"rpq_fx \w+: code {case['bad']} is out of range for {K} codewords"):
        _calls(codebooks, codes, case["where"][1])[op]()


@pytest.mark.parametrize("K", [1, 16, 255, 256, 300, 32768, 65536])
def test_the_largest_valid_code_is_accepted(backend, K):
    C, N, d = 2, 5, 3
    codes = _codes_with(K - 1, C, N, K, (1, 4), 0)
    codebooks = torch.randn(C, K, d, dtype=torch.float64)
    reference = torch.cat([codebooks[c, (codes[c].long() & 0xFFFF)] for c in range(C)], dim=1)
    for name, call in _calls(codebooks, codes, 4).items():
        out = call()
        if name == "expand":
            assert torch.equal(out, reference)


def test_issue_repro_no_longer_reads_past_the_codebooks(backend):
    with pytest.raises(IndexError, match="rpq_fx expand: code 20 is out of range for 16 codewords"):
        torch.ops.rpq_fx.expand(torch.arange(192.).reshape(3, 16, 4), torch.full((3, 4), 20, dtype=torch.uint8))
    # K = 16 and codes of 255: the backward wrote outside the gradient buffer ("double free or corruption")
    codebooks = torch.randn(2, 16, 4, requires_grad=True)
    with pytest.raises(IndexError, match="code 255 is out of range for 16 codewords"):
        torch.ops.rpq_fx.expand_backward(torch.randn(8, 8), torch.full((2, 8), 255, dtype=torch.uint8), 2, 16)
    with pytest.raises(IndexError, match="code 255"):
        ops.linear(torch.randn(4, 8), codebooks, torch.full((2, 8), 255, dtype=torch.uint8), None, "compressed")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.float32, torch.bool])
def test_every_op_rejects_codes_of_another_dtype(backend, dtype):
    codebooks = torch.randn(2, 16, 3)
    codes = torch.ones(2, 5, dtype=dtype)
    for name, call in _calls(codebooks, codes, 0).items():
        with pytest.raises(TypeError, match=rf"rpq_fx \w+: codes must be uint8 or int16, got (torch\.)?\w+"):
            call()


def _shape_cases():
    cb, codes = torch.randn(3, 16, 4), torch.zeros(3, 10, dtype=torch.uint8)
    x, grad_y = torch.randn(2, 12), torch.randn(2, 10)
    return {
        "expand: 2 codebooks for 3 slices": (lambda: torch.ops.rpq_fx.expand(cb[:2], codes),
                                             "2 codebooks for 3 slices"),
        "expand: codes 1-D": (lambda: torch.ops.rpq_fx.expand(cb, codes[0]), "codes must be"),
        "expand_backward: grad rows": (lambda: torch.ops.rpq_fx.expand_backward(torch.randn(9, 12), codes, 3, 16),
                                       "grad must be"),
        "expand_backward: grad columns": (lambda: torch.ops.rpq_fx.expand_backward(torch.randn(10, 13), codes, 3, 16),
                                          "grad must be"),
        "expand_backward: groups": (lambda: torch.ops.rpq_fx.expand_backward(torch.randn(10, 12), codes, 2, 16),
                                    "num_groups must be 3 or 1"),
        "expand_backward: no slices": (lambda: torch.ops.rpq_fx.expand_backward(
            torch.randn(10, 12), codes[:0], 1, 16), "C >= 1"),
        "expand_backward: no codewords": (lambda: torch.ops.rpq_fx.expand_backward(torch.randn(10, 12), codes, 3, 0),
                                          "num_codes must be positive"),
        "linear: features": (lambda: torch.ops.rpq_fx.linear(torch.randn(2, 13), cb, codes), "features"),
        "linear: codebooks": (lambda: torch.ops.rpq_fx.linear(x, cb[:2], codes), "2 codebooks for 3 slices"),
        "linear_backward: grad": (lambda: torch.ops.rpq_fx.linear_backward(torch.randn(2, 11), x, cb, codes, True,
                                                                           True), "grad must be"),
        "linear_backward: grad batch": (lambda: torch.ops.rpq_fx.linear_backward(torch.randn(3, 10), x, cb, codes,
                                                                                 True, True), "grad must be"),
        "linear_backward: dtype": (lambda: torch.ops.rpq_fx.linear_backward(grad_y.double(), x, cb, codes, True, True),
                                   "want one dtype"),
        "embedding: codebooks": (lambda: torch.ops.rpq_fx.embedding(torch.tensor([1]), cb[:2], codes),
                                 "2 codebooks for 3 slices"),
    }


@pytest.mark.parametrize("name", sorted(_shape_cases()))
def test_every_op_rejects_shapes_that_do_not_fit(backend, name):
    call, message = _shape_cases()[name]
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("path", ["compressed", "expand"])
def test_shape_errors_name_the_op_on_meta_tensors_too(path):
    cb, codes = torch.empty(3, 16, 4, device="meta"), torch.empty(3, 10, dtype=torch.uint8, device="meta")
    with pytest.raises(RuntimeError, match="rpq_fx linear_backward: grad must be"):
        torch.ops.rpq_fx.linear_backward(torch.empty(2, 11, device="meta"), torch.empty(2, 12, device="meta"), cb,
                                         codes, True, True, path)
    with pytest.raises(RuntimeError, match="rpq_fx expand: 2 codebooks for 3 slices"):
        torch.ops.rpq_fx.expand(cb[:2], codes)
    with pytest.raises(TypeError, match="codes must be uint8 or int16"):
        torch.ops.rpq_fx.expand(cb, codes.long())


@FAST
@given(N=st.integers(1, 30), index=st.one_of(st.integers(-40, -1), st.integers(30, 70)))
def test_embedding_indices_out_of_range_raise(backend, N, index):
    codebooks, codes = torch.randn(2, 8, 3), torch.zeros(2, N, dtype=torch.uint8)
    index = index if index < 0 else N + index - 30
    with pytest.raises(IndexError, match=rf"rpq_fx embedding: index {index} is out of range for {N} rows"):
        torch.ops.rpq_fx.embedding(torch.tensor([0, index]), codebooks, codes)


@pytest.mark.parametrize("indices,hot_index", [([-1], [0, 3]), ([5], [0, 3]), ([1], [0, 7]), ([1], [-1, 3])])
def test_hot_embedding_rejects_indices_out_of_range(indices, hot_index):
    """Rows 0..4 with two hot rows; a negative index must not wrap round to the last row as ``slots[-1]`` did."""
    codebooks, codes = torch.randn(2, 8, 3), torch.zeros(2, 2, dtype=torch.uint8)
    with pytest.raises(IndexError, match="out of"):
        ops.hot_embedding(torch.tensor(indices), codebooks, codes, torch.tensor(hot_index, dtype=torch.int32), 5)


def test_hot_embedding_rejects_a_hot_index_of_another_length():
    codebooks, codes = torch.randn(2, 8, 3), torch.zeros(2, 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="hot_index must list the 2 hot rows"):
        ops.hot_embedding(torch.tensor([1]), codebooks, codes, torch.tensor([0, 3, 4], dtype=torch.int32), 5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_the_kernel_ops_check_what_they_read(backend_name):
    """The kernel-level ops, called without the op around them (C++ on the CPU, or stock), refuse bad input too."""
    codebooks, codes = torch.randn(3, 16, 4), torch.full((3, 5), 16, dtype=torch.uint8)
    x = torch.randn(2, 12)
    with (ops.stock_ops() if backend_name == "torch" else contextlib.nullcontext()):
        with pytest.raises(IndexError, match="rpq_fx expand: code 16"):
            torch.ops.rpq_fx.expand(codebooks, codes)
        with pytest.raises(IndexError, match="rpq_fx expand_backward: code 16"):
            torch.ops.rpq_fx._expand_backward_add(torch.zeros(3, 16, 4), torch.randn(5, 12), codes)
        with pytest.raises(IndexError, match="rpq_fx linear\\w*: code 16"):
            torch.ops.rpq_fx._linear_compressed(x, codebooks, codes)
        with pytest.raises(IndexError, match="rpq_fx linear_backward: code 16"):
            torch.ops.rpq_fx._linear_compressed_backward(torch.randn(2, 5), x, codebooks, codes, True, True)
    if backend_name == "cpp":
        with pytest.raises(RuntimeError, match="2 codebooks for 3 slices"):
            torch.ops.rpq_fx._expand_backward_add(torch.zeros(2, 16, 4), torch.randn(5, 12), codes.clamp_max(3))
        with pytest.raises(RuntimeError, match="grad \\[N, C\\*d\\]"):
            torch.ops.rpq_fx._expand_backward_add(torch.zeros(1, 16, 4), torch.randn(5, 12), codes[:0])
        with pytest.raises(RuntimeError, match="_nearest: attempted to run this operator with Meta tensors"):
            _kernels.kernels().nearest(torch.empty(2, 3, 4, device="meta"), torch.empty(2, 5, 4, device="meta"))
