"""``rpq_fx::conv``: the block-by-block convolution equals ``F.conv{n}d`` on the expanded weight, forward and
backward, for every spatial rank, stride / padding / dilation / groups, batched or not, and block size."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import rpq_fx.ops.conv as conv_module
from rpq_fx.ops import expand
from rpq_fx.ops.conv import conv

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference(x, codebooks, codes, bias, shape, stride, padding, dilation, groups):
    """The dense convolution on the expanded weight (autograd through ``expand`` and torch's conv)."""
    return CONVS[len(shape) - 2](x, expand(codebooks, codes).view(shape), bias, stride, padding, dilation, groups)


@st.composite
def cases(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    per_group = draw(st.integers(1, 4))
    cin = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    row = cin * math.prod(kernel)
    d = draw(st.sampled_from([v for v in range(1, row + 1) if row % v == 0]))
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    padding = [draw(st.integers(0, 2)) for _ in range(dims)]
    size = [draw(st.integers(dilation[i] * (kernel[i] - 1) + 1, 7)) for i in range(dims)]
    return dict(dims=dims, groups=groups, shape=[groups * per_group, cin, *kernel], d=d,
                shared=draw(st.booleans()), num_codes=draw(st.sampled_from([1, 5, 16])),
                batch=draw(st.sampled_from([None, 1, 3])), size=size, stride=stride, padding=padding,
                dilation=dilation, bias=draw(st.booleans()), block_rows=draw(st.integers(1, 8)))


def _tensors(case, dtype=torch.float64):
    shape, d, groups = case["shape"], case["d"], case["groups"]
    num_slices = math.prod(shape[1:]) // d
    codebooks = torch.randn(1 if case["shared"] else num_slices, case["num_codes"], d, dtype=dtype,
                            requires_grad=True)
    codes = torch.randint(0, case["num_codes"], (num_slices, shape[0]), dtype=torch.uint8)
    batch = () if case["batch"] is None else (case["batch"],)
    x = torch.randn(*batch, shape[1] * groups, *case["size"], dtype=dtype, requires_grad=True)
    bias = torch.randn(shape[0], dtype=dtype, requires_grad=True) if case["bias"] else None
    return x, codebooks, codes, bias


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_conv_forward_and_backward_equal_the_dense_convolution(case):
    x, codebooks, codes, bias = _tensors(case)
    args = (case["shape"], case["stride"], case["padding"], case["dilation"], case["groups"])
    inputs = [t for t in (x, codebooks, bias) if t is not None]
    expected = reference(x, codebooks, codes, bias, *args)
    grad = torch.randn_like(expected)
    wanted = torch.autograd.grad(expected, inputs, grad)
    with pytest.MonkeyPatch.context() as patch:  # blocks of a few output channels (whole groups): several run
        patch.setattr(conv_module, "BLOCK_BYTES", case["block_rows"] * math.prod(case["shape"][1:]) * 8)
        patch.setattr(conv_module, "INPUT_RATIO", 0)  # blocks whatever the input's size
        out = conv(x, codebooks, codes, bias, *args)
        actual = torch.autograd.grad(out, inputs, grad)
    torch.testing.assert_close(out, expected)
    for a, w in zip(actual, wanted):
        torch.testing.assert_close(a, w)


def test_blocks_cover_whole_groups(monkeypatch):
    # 2 MiB holds 113 rows of 4608 float32 values: 112, a multiple of 16
    assert conv_module._blocks([512, 512, 3, 3], 1, 4) == [slice(n, min(n + 112, 512)) for n in range(0, 512, 112)]
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 5 * 36 * 4)  # 5 rows of 36 float32 values
    assert conv_module._blocks([12, 4, 3, 3], 1, 4) == [slice(0, 5), slice(5, 10), slice(10, 12)]
    assert conv_module._blocks([12, 4, 3, 3], 3, 4) == [slice(0, 4), slice(4, 8), slice(8, 12)]  # 4 per group
    assert conv_module._blocks([12, 4, 3, 3], 2, 4) == [slice(0, 6), slice(6, 12)]  # one group is 6 > 5 rows


@pytest.fixture
def blocks_always(monkeypatch):
    monkeypatch.setattr(conv_module, "INPUT_RATIO", 0)


def test_gradcheck_with_blocks_and_groups(monkeypatch, blocks_always):
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 2 * 12 * 8)
    case = dict(dims=2, groups=2, shape=[6, 2, 2, 3], d=4, shared=False, num_codes=4, batch=1, size=[4, 5],
                stride=[2, 1], padding=[1, 0], dilation=[1, 2], bias=True)
    x, codebooks, codes, bias = _tensors(case)
    args = (case["shape"], case["stride"], case["padding"], case["dilation"], case["groups"])
    assert torch.autograd.gradcheck(lambda x, cb, b: conv(x, cb, codes, b, *args), (x, codebooks, bias), fast_mode=True)


def test_opcheck_schema_fake_and_autograd(monkeypatch, blocks_always):
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 3 * 18 * 4)
    codebooks = torch.randn(9, 16, 2, requires_grad=True)
    codes = torch.randint(0, 16, (9, 8), dtype=torch.uint8)
    x = torch.randn(2, 2, 6, 5, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    torch.library.opcheck(conv, (x, codebooks, codes, bias, [8, 2, 3, 3], [1, 1], [1, 1], [1, 1], 1))


def test_float32_and_bfloat16_blocks_match_the_dense_convolution(monkeypatch, blocks_always):
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 4096)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        codebooks = torch.randn(72, 32, 8, dtype=dtype)
        codes = torch.randint(0, 32, (72, 40), dtype=torch.uint8)
        x = torch.randn(2, 64, 9, 9, dtype=dtype)
        out = conv(x, codebooks, codes, None, [40, 64, 3, 3], [1, 1], [1, 1], [1, 1], 1)
        expected = F.conv2d(x.double(), expand(codebooks, codes).view(40, 64, 3, 3).double(), padding=1)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_autocast_casts_as_f_conv2d():
    codebooks = torch.randn(9, 16, 4)
    codes = torch.randint(0, 16, (9, 8), dtype=torch.uint8)
    x = torch.randn(1, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, codebooks, codes, None, [8, 4, 3, 3], [1, 1], [0, 0], [1, 1], 1)
        dense = F.conv2d(x, expand(codebooks, codes).view(8, 4, 3, 3))
    assert out.dtype == dense.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, message", [
    (dict(shape=[8, 4, 3]), "expand to"),
    (dict(shape=[8, 2, 3, 3]), "expand to"),
    (dict(groups=3), "groups must be a positive divisor"),
    (dict(stride=[1]), "stride must have 2 values"),
    (dict(x=torch.randn(1, 5, 6, 6)), "input"),
    (dict(bias=torch.randn(7)), "bias must be"),
    (dict(x=torch.randn(1, 4, 6, 6, dtype=torch.float64)), "one dtype"),
])
def test_bad_arguments_name_the_value(bad, message):
    args = dict(x=torch.randn(1, 4, 6, 6), bias=None, shape=[8, 4, 3, 3], stride=[1, 1], groups=1)
    args.update(bad)
    codebooks = torch.randn(9, 16, 4)
    codes = torch.randint(0, 16, (9, 8), dtype=torch.uint8)
    with pytest.raises((RuntimeError, ValueError), match=message):
        conv(args["x"], codebooks, codes, args["bias"], args["shape"], args["stride"], [0, 0], [1, 1], args["groups"])


def test_blocks_only_where_the_input_is_small_beside_the_weight():
    shape = [512, 512, 3, 3]  # 9.4 MB
    assert conv_module._blocked(torch.empty(1, 512, 7, 7), shape)  # 100 KB: resnet50's layer4 at batch 1
    assert conv_module._blocked(torch.empty(8, 512, 7, 7), shape)
    assert not conv_module._blocked(torch.empty(32, 512, 7, 7), shape)  # 3.2 MB: 4x that is above the weight
    assert not conv_module._blocked(torch.empty(1, 64, 7, 7), [64, 64, 3, 3])  # 147 KB: one block
    assert len(conv_module._parts(torch.empty(32, 512, 7, 7), shape, 1)) == 1
    assert len(conv_module._parts(torch.empty(1, 512, 7, 7), shape, 1)) == 5


def test_blocks_pay_only_above_one_block():
    assert not conv_module.blocks_pay([64, 64, 3, 3], torch.float32)  # 147 KB: one block
    assert conv_module.blocks_pay([512, 512, 3, 3], torch.float32)  # 9.4 MB: resnet50's layer4 conv
    assert not conv_module.blocks_pay([512, 256, 2, 2], torch.float32)  # exactly 2 MiB: one block
