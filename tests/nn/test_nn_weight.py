"""Tests of ``RPQWeight``: layout, dtypes, init, validation, meta, state_dict, gradients."""

import math

import pytest
import torch

from rpq_fx.nn import RPQWeight
from rpq_fx.nn.weight import code_dtype, rpq_bytes


def unsigned(codes: torch.Tensor) -> torch.Tensor:
    """Stored codes -> int64 code values (int16 codes are unsigned bit patterns)."""
    return codes.to(torch.int64) & 0xFFFF if codes.dtype == torch.int16 else codes.to(torch.int64)


def reference_weight(w: RPQWeight) -> torch.Tensor:
    """``W[n, c*d:(c+1)*d] = codebooks[g(c), codes[c, n]]`` built independently of the op."""
    cb, codes = w.codebooks.detach(), unsigned(w.codes)
    rows = [cb[0 if w.shared_codebooks else c, codes[c]] for c in range(w.num_codebooks)]
    return torch.cat(rows, dim=1)


# --------------------------------------------------------------------------- layout

def test_reference_rpq_sizes():
    w = RPQWeight(num_codebooks=72, codebook_dim=128, num_vectors=9216)
    assert w.codebooks.shape == (72, 256, 128)
    assert isinstance(w.codebooks, torch.nn.Parameter)
    assert w.indices is w.codes
    assert w.indices.shape == (72, 9216)
    assert w.indices.dtype == torch.uint8
    full = w()
    assert full.shape == (9216, 9216)
    assert full.dtype == torch.float32
    # spot-check the formula on a few rows (the full reference would be another 340 MB)
    rows = torch.tensor([0, 1, 4607, 9215])
    codes = w.codes.long()
    for n in rows.tolist():
        expected = torch.cat([w.codebooks.detach()[c, codes[c, n]] for c in range(72)])
        assert torch.equal(full[n], expected)


def test_default_is_unshared_uint8():
    w = RPQWeight(4, 8, 300)
    assert w.num_codes == 256 and not w.shared_codebooks
    assert w.codebooks.shape == (4, 256, 8)
    assert w.codes.dtype == torch.uint8


@pytest.mark.parametrize("K", [2, 16, 256])
def test_shared_codebooks_shape(K):
    w = RPQWeight(6, 4, 50, K, shared_codebooks=True)
    assert w.codebooks.shape == (1, K, 4)
    assert w.codes.shape == (6, 50)
    assert torch.equal(w(), reference_weight(w))
    # every slice is drawn from the one codebook
    assert torch.equal(w()[:, 8:12], w.codebooks.detach()[0, w.codes[2].long()])


@pytest.mark.parametrize("K,dtype", [(2, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                     (32768, torch.int16), (65536, torch.int16)])
def test_code_dtype(K, dtype):
    assert code_dtype(K) == dtype
    w = RPQWeight(2, 3, 10, num_codes=K)
    assert w.codes.dtype == dtype
    assert w.codebooks.shape == (2, K, 3)


@pytest.mark.parametrize("K", [2, 3, 256, 257, 40000, 65536])
@pytest.mark.parametrize("shared", [False, True])
def test_codes_in_range_after_init(K, shared):
    w = RPQWeight(4, 2, 4096, num_codes=K, shared_codebooks=shared)
    u = unsigned(w.codes)
    assert int(u.min()) >= 0 and int(u.max()) < K
    if K <= 256:
        # 16384 draws: every codeword is used
        assert torch.unique(u).numel() == K
    else:
        # the random codes cover the whole (unsigned) range, not only its first half
        assert int(u.max()) > K * 0.9
    if K > 32768:
        assert bool((w.codes < 0).any()), "codes >= 32768 are stored as negative int16 patterns"
    assert torch.equal(w(), reference_weight(w))


@pytest.mark.parametrize("C,d,N,K,shared", [(1, 1, 1, 2, False), (3, 5, 17, 7, False), (3, 5, 17, 7, True),
                                            (8, 16, 64, 300, False), (2, 4, 33, 65536, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expanded_value_follows_formula(C, d, N, K, shared, dtype):
    w = RPQWeight(C, d, N, K, shared, dtype=dtype)
    out = w()
    assert out.shape == (N, C * d) and out.dtype == dtype
    assert torch.equal(out, reference_weight(w))
    # element-wise on a couple of entries
    codes = unsigned(w.codes)
    n, c = N - 1, C - 1
    g = 0 if shared else c
    assert torch.equal(out[n, c * d:(c + 1) * d], w.codebooks.detach()[g, codes[c, n]])


def test_reset_parameters_changes_values_and_is_reproducible():
    w = RPQWeight(4, 8, 500, 64)
    w.reset_parameters(generator=torch.Generator().manual_seed(123))
    before = (w.codebooks.detach().clone(), w.codes.clone())
    w.reset_parameters(generator=torch.Generator().manual_seed(0))
    first = (w.codebooks.detach().clone(), w.codes.clone())
    assert not torch.equal(first[0], before[0]) and not torch.equal(first[1], before[1])
    w.reset_parameters(generator=torch.Generator().manual_seed(0))
    assert torch.equal(w.codebooks, first[0]) and torch.equal(w.codes, first[1])


def test_reset_parameters_rejects_unknown_init():
    w = RPQWeight(2, 2, 4)
    with pytest.raises(ValueError, match="init.*'xavier'"):
        w.reset_parameters("xavier")


# --------------------------------------------------------------------------- init statistics

def test_uniform_init_matches_dense_default():
    C, d = 8, 64
    row_len = C * d
    w = RPQWeight(C, d, 2000, num_codes=1024)
    w.reset_parameters("uniform", generator=torch.Generator().manual_seed(1))
    values = w.codebooks.detach().double()
    bound = 1 / math.sqrt(row_len)
    assert float(values.abs().max()) <= bound
    assert float(values.abs().max()) > 0.99 * bound
    expected_var = 1 / (3 * row_len)  # variance of U(-b, b) = b^2 / 3
    assert abs(float(values.var()) / expected_var - 1) < 0.02
    assert abs(float(values.mean())) < 0.01 * bound
    # the expanded weight is drawn from the codebooks, so it has the same spread
    full = w().detach().double()
    assert abs(float(full.var()) / expected_var - 1) < 0.05


def test_normal_init_has_unit_std():
    w = RPQWeight(8, 64, 100, num_codes=1024)
    w.reset_parameters("normal", generator=torch.Generator().manual_seed(2))
    values = w.codebooks.detach().double()
    assert abs(float(values.std()) - 1) < 0.01
    assert abs(float(values.mean())) < 0.01
    assert float(values.abs().max()) > 3  # not a bounded uniform


# --------------------------------------------------------------------------- shape views

@pytest.mark.parametrize("shape", [(8, 2, 3, 3), [8, 2, 3, 3], torch.Size([8, 18]), (8, 18, 1), (8, 6, 3)])
def test_shape_views(shape):
    w = RPQWeight(2, 9, 8, shape=shape)
    assert w.shape == tuple(shape)
    out = w()
    assert out.shape == tuple(shape)
    assert torch.equal(out.reshape(8, 18), reference_weight(w))


def test_conv3d_shape_view_rows_are_output_channels():
    w = RPQWeight(3, 4, 5, shape=(5, 3, 2, 2, 1))
    out = w()
    assert out.shape == (5, 3, 2, 2, 1)
    assert torch.equal(out[4].reshape(-1), reference_weight(w)[4])


# --------------------------------------------------------------------------- validation

BAD_ARGS = [
    ("num_codebooks", 0), ("num_codebooks", -3), ("num_codebooks", 2.0), ("num_codebooks", True),
    ("num_codebooks", "4"),
    ("codebook_dim", 0), ("codebook_dim", -1), ("codebook_dim", 1.5), ("codebook_dim", False),
    ("num_vectors", 0), ("num_vectors", -8), ("num_vectors", 8.0), ("num_vectors", True),
    ("num_codes", 1), ("num_codes", 0), ("num_codes", -256), ("num_codes", 65537), ("num_codes", 256.0),
    ("num_codes", True),
]


@pytest.mark.parametrize("name,value", BAD_ARGS)
def test_invalid_arguments_raise(name, value):
    kwargs = dict(num_codebooks=2, codebook_dim=4, num_vectors=8, num_codes=16)
    kwargs[name] = value
    with pytest.raises(ValueError) as info:
        RPQWeight(**kwargs)
    message = str(info.value)
    assert name in message
    assert repr(value) in message or str(value) in message


@pytest.mark.parametrize("shape", [(8, 9), (4, 16), (8, 2, 2, 3), (16, 4), (8, -2, -4), (8, 8.0), (), (8, 0, 8),
                                   (8, True, 8)])
def test_shape_that_does_not_match_raises(shape):
    with pytest.raises(ValueError) as info:
        RPQWeight(2, 4, 8, shape=shape)
    assert "shape" in str(info.value)
    assert str(tuple(shape)) in str(info.value)


def test_valid_extremes_are_accepted():
    assert RPQWeight(1, 1, 1, num_codes=2)().shape == (1, 1)
    assert RPQWeight(1, 1, 3, num_codes=65536).codes.dtype == torch.int16


# --------------------------------------------------------------------------- meta device

def test_meta_device_allocates_nothing():
    # real storage: codebooks 72*256*128*4 B, codes 72*10**9 B (72 GB), weight 10**9*9216*4 B
    w = RPQWeight(72, 128, 10**9, device="meta")
    assert w.codebooks.is_meta and w.codes.is_meta
    assert w.codes.dtype == torch.uint8 and w.codes.shape == (72, 10**9)
    out = w()
    assert out.is_meta and out.shape == (10**9, 9216)
    big16 = RPQWeight(4, 8, 10**9, num_codes=65536, shared_codebooks=True, device="meta", dtype=torch.float64)
    assert big16.codebooks.shape == (1, 65536, 8) and big16.codebooks.dtype == torch.float64
    assert big16.codes.dtype == torch.int16 and big16().is_meta


def test_meta_then_to_empty_and_reset():
    w = RPQWeight(3, 4, 20, 16, device="meta")
    w.to_empty(device="cpu")
    w.reset_parameters()
    assert not w.codebooks.is_meta
    assert int(unsigned(w.codes).max()) < 16
    assert torch.equal(w(), reference_weight(w))


# --------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("K,shared", [(16, False), (300, True), (65536, False)])
def test_state_dict_round_trip(K, shared, tmp_path):
    src = RPQWeight(3, 4, 40, K, shared)
    sd = src.state_dict()
    assert set(sd) == {"codebooks", "codes"}
    assert sd["codes"].dtype == code_dtype(K)
    torch.save(sd, tmp_path / "w.pt")
    dst = RPQWeight(3, 4, 40, K, shared)
    assert not torch.equal(dst(), src())
    dst.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert torch.equal(dst.codes, src.codes)
    assert torch.equal(dst(), src())


def test_state_dict_shape_mismatch_is_refused():
    src = RPQWeight(3, 4, 40, 16)
    dst = RPQWeight(3, 4, 40, 32)
    with pytest.raises(RuntimeError, match="codebooks"):
        dst.load_state_dict(src.state_dict())


# --------------------------------------------------------------------------- gradients

def test_only_codebooks_are_trainable():
    w = RPQWeight(4, 3, 25, 8)
    assert [name for name, _ in w.named_parameters()] == ["codebooks"]
    assert [name for name, _ in w.named_buffers()] == ["codes"]
    assert not w.codes.requires_grad
    w().square().sum().backward()
    assert w.codebooks.grad is not None and w.codebooks.grad.abs().sum() > 0
    assert w.codes.grad is None


def test_codebook_gradient_value():
    """Gradient of sum(W * G) reaches codebooks[c, k] as the sum of G over the slices coded k."""
    C, d, N, K = 3, 2, 30, 5
    w = RPQWeight(C, d, N, K, dtype=torch.float64)
    G = torch.randn(N, C * d, dtype=torch.float64)
    (w() * G).sum().backward()
    codes = unsigned(w.codes)
    expected = torch.zeros(C, K, d, dtype=torch.float64)
    for c in range(C):
        for n in range(N):
            expected[c, codes[c, n]] += G[n, c * d:(c + 1) * d]
    torch.testing.assert_close(w.codebooks.grad, expected)


def test_to_dtype_keeps_codes():
    w = RPQWeight(2, 4, 10, 300)
    w.to(torch.float64)
    assert w.codebooks.dtype == torch.float64
    assert w.codes.dtype == torch.int16
    assert w().dtype == torch.float64


def test_rpq_bytes():
    assert rpq_bytes(72, 128, 9216, 256, False, 4) == 72 * 256 * 128 * 4 + 72 * 9216
    assert rpq_bytes(4, 8, 100, 300, True, 2) == 300 * 8 * 2 + 4 * 100 * 2
    w = RPQWeight(72, 128, 9216, device="meta")
    assert rpq_bytes(72, 128, 9216, 256, False, 4) == (
        w.codebooks.numel() * w.codebooks.element_size() + w.codes.numel() * w.codes.element_size())


def test_extra_repr():
    text = repr(RPQWeight(2, 4, 8, 16, True))
    assert "num_codebooks=2" in text and "codebook_dim=4" in text and "num_codes=16" in text
    assert "shared_codebooks=True" in text


def _holder(weight: RPQWeight) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.fc = weight
    return holder


@pytest.mark.parametrize("K, key, value, message", [
    (256, "fc.codes", torch.full((4, 300), 1000), r"fc.codes: value 1000 is out of range: must be in \[0, 256\)"),
    (256, "fc.codes", torch.full((4, 300), -1), r"fc.codes: value -1 is out of range"),
    (16, "fc.codes", torch.full((4, 300), 16, dtype=torch.uint8), r"fc.codes: code 16 is out of range for 16"),
    (300, "fc.codes", torch.full((4, 300), 300, dtype=torch.int16), r"fc.codes: code 300 is out of range for 300"),
    (256, "fc.codes", torch.full((4, 300), 3.5), r"fc.codes: torch.float32 value 3.5 is not a whole number"),
    (256, "fc.codes", torch.full((4, 300), float("nan")), r"fc.codes: .*nan is not a whole number"),
    (256, "fc.codes", torch.ones(4, 300, dtype=torch.bool), r"fc.codes: expected integers .*got a torch.bool"),
    (16, "fc.hot_index", torch.full((5,), 300, dtype=torch.int32), r"fc.hot_index: value 300 is out of range.*\[0, 300\)"),
    (16, "fc.hot_index", torch.full((5,), -2, dtype=torch.int64), r"fc.hot_index: value -2 is out of range"),
    (16, "fc.hot.codes", torch.full((4, 5), 20, dtype=torch.uint8), r"fc.hot.codes: code 20 is out of range for 16"),
])
def test_load_state_dict_refuses_codes_and_rows_out_of_range_or_wrapping(K, key, value, message):
    weight = RPQWeight(4, 8, 300, K, hot_rows=5, hot_codebook_dim=8)
    holder = _holder(weight)
    state = holder.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises((IndexError, TypeError), match=message):
        holder.load_state_dict({**state, key: value})
    assert all(torch.equal(before[k], v) for k, v in holder.state_dict().items()), "nothing was loaded"


@pytest.mark.parametrize("K, value", [(256, 255), (65536, 40000)])
def test_load_state_dict_accepts_other_dtypes_that_hold_the_codes_exactly(K, value):
    weight = RPQWeight(2, 4, 300, K)
    holder = _holder(weight)
    for codes in (torch.full((2, 300), value, dtype=torch.int64), torch.full((2, 300), float(value))):
        holder.load_state_dict({**holder.state_dict(), "fc.codes": codes})
        assert weight.codes.dtype == code_dtype(K)
        assert int(weight.codes.to(torch.int32).bitwise_and(0xFFFF).max()) == value


def test_assigned_codes_must_keep_dtype_shape_and_range():
    weight = RPQWeight(2, 4, 300, 16)
    with pytest.raises(TypeError, match=r"RPQWeight.codes: expected a \[2, 300\] torch.uint8 tensor, got \[2, 300\] torch.int64"):
        weight.codes = torch.zeros(2, 300, dtype=torch.int64)
    with pytest.raises(IndexError, match="code 16 is out of range for 16"):
        weight.codes = torch.full((2, 300), 16, dtype=torch.uint8)
    weight.codes = torch.full((2, 300), 15, dtype=torch.uint8)
    assert int(weight.codes.max()) == 15
