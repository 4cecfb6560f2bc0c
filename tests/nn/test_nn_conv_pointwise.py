"""A pointwise convolution (1x1 kernel, no padding, one group) in ``rpq_fx::conv`` computes from codebooks and codes
(tables, then a sum of table rows per output channel), another ungrouped 2-D one the same way on its unfolded input:
the same output and gradients as ``F.conv`` on the decompressed weight (the independent dense reference), chosen
where it pays, fused by ``convert``."""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
import rpq_fx.ops.conv as conv_module
from rpq_fx.nn import RPQConv2d

CONV = torch.ops.rpq_fx.conv.default
EXPAND = torch.ops.rpq_fx.expand.default
_FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@contextlib.contextmanager
def pointwise_calls():
    """A list that gets one entry per call of the compressed path (pointwise, or on the unfolded input)."""
    calls = []
    real = conv_module._pointwise
    with mock.patch.object(conv_module, "_pointwise", lambda *a: calls.append(a) or real(*a)):
        yield calls


def case(ref, in_channels, out_channels, dim, num_codes, shared, dtype=torch.float32, seed=0):
    """Codebooks, codes and bias of a pointwise layer, and its decompressed weight ``[out, in, 1, ...]``."""
    generator = torch.Generator().manual_seed(seed)
    num_codebooks = in_channels // dim
    codebooks = torch.randn(1 if shared else num_codebooks, num_codes, dim, generator=generator, dtype=dtype)
    codes = torch.randint(0, num_codes, (num_codebooks, out_channels), generator=generator, dtype=torch.uint8)
    bias = torch.randn(out_channels, generator=generator, dtype=dtype)
    return codebooks, codes, bias, ref.expand(codebooks, codes).view(out_channels, in_channels)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dim=st.sampled_from([1, 2, 4, 8]), num_codebooks=st.integers(1, 4), out_channels=st.integers(1, 40),
       num_codes=st.sampled_from([4, 16, 256]), shared=st.booleans(), batch=st.integers(1, 5),
       height=st.integers(1, 9), width=st.integers(1, 9), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_pointwise_conv2d_matches_f_conv2d_on_the_decompressed_weight(ref, dim, num_codebooks, out_channels,
                                                                    num_codes, shared, batch, height, width, stride,
                                                                    bias, seed):
    in_channels = dim * num_codebooks
    codebooks, codes, b, weight = case(ref, in_channels, out_channels, dim, num_codes, shared, seed=seed)
    b = b if bias else None
    x = torch.randn(batch, in_channels, height, width, generator=torch.Generator().manual_seed(seed + 1))
    expected = F.conv2d(x, weight.view(out_channels, in_channels, 1, 1), b, stride)
    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, codes, b, [out_channels, in_channels, 1, 1], list(stride), [0, 0],
                               [1, 1], 1)
    assert len(calls) == 1
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("dims", [1, 3])
def test_pointwise_conv1d_and_conv3d_and_unbatched(ref, dims):
    codebooks, codes, bias, weight = case(ref, 8, 12, 4, 16, False)
    shape = [12, 8] + [1] * dims
    stride = [2] + [1] * (dims - 1)
    x = torch.randn(3, 8, *[5] * dims)
    functional = _FUNCTIONAL[dims]
    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, codes, bias, shape, stride, [0] * dims, [1] * dims, 1)
        unbatched = conv_module.conv(x[0], codebooks, codes, bias, shape, stride, [0] * dims, [1] * dims, 1)
    assert len(calls) == 2
    expected = functional(x, weight.view(shape), bias, stride)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unbatched, expected[0], rtol=1e-4, atol=1e-4)


def test_int16_codes_above_32767_are_read_unsigned(ref):
    generator = torch.Generator().manual_seed(0)
    codebooks = torch.randn(2, 40000, 2, generator=generator)
    codes = torch.randint(0, 40000, (2, 6), generator=generator).to(torch.int32)
    assert (codes > 32767).any()
    stored = codes.to(torch.int16)  # bit patterns: negative for codes above 32767
    weight = ref.expand(codebooks, stored).view(6, 4, 1, 1)
    x = torch.randn(2, 4, 3, 3)
    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, stored, None, [6, 4, 1, 1], [1, 1], [0, 0], [1, 1], 1)
    assert len(calls) == 1
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
def test_pointwise_gradients_match_the_dense_reference_and_gradcheck(ref, stride, shared):
    codebooks, codes, bias, _ = case(ref, 8, 6, 4, 4, shared, dtype=torch.float64)
    shape = [6, 8, 1, 1]
    x = torch.randn(2, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    codebooks.requires_grad_()
    bias.requires_grad_()

    def op(x, codebooks, bias):
        return conv_module.conv(x, codebooks, codes, bias, shape, [stride] * 2, [0, 0], [1, 1], 1)

    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        out = op(x, codebooks, bias)
        assert torch.autograd.gradcheck(op, (x, codebooks, bias))
    assert calls
    dense = [t.detach().clone().requires_grad_() for t in (x, codebooks, bias)]
    expected = F.conv2d(dense[0], ref.expand(dense[1], codes).view(shape), dense[2], stride)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, codebooks, bias), grad)
    want = torch.autograd.grad(expected, dense, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("out_channels, pays", [(1024, True), (2048, True), (512, False)])
def test_the_pointwise_path_is_chosen_where_its_saving_pays(ref, out_channels, pays):
    """resnet50's 1x1 layers under RPQ's defaults (K = 256, d = 64): 1024 and 2048 outputs save 3.8x / 7.1x of the
    products (the measured threshold is 3), 512 outputs 1.9x."""
    codebooks, codes, _, weight = case(ref, 128, out_channels, 64, 256, False)
    shape = [out_channels, 128, 1, 1]
    assert conv_module.pointwise_pays(shape, [0, 0], 1, 256, 64) is pays
    assert conv_module.fused_pays(shape, torch.float32, [1, 1], [0, 0], 1, tuple(codebooks.shape)) is pays
    assert conv_module.fused_pays(shape, torch.float32, [2, 2], [0, 0], 1, tuple(codebooks.shape)), "strided"
    assert not conv_module.pointwise_pays(shape, [1, 1], 1, 256, 64), "padding: not pointwise"
    assert not conv_module.pointwise_pays([out_channels, 64, 1, 1], [0, 0], 2, 256, 64), "grouped: not pointwise"
    x = torch.randn(1, 128, 4, 4)
    with pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, codes, None, shape, [1, 1], [0, 0], [1, 1], 1)
        with rpq_fx.compute_path("expand"):
            conv_module.conv(x, codebooks, codes, None, shape, [1, 1], [0, 0], [1, 1], 1)
        conv_module.conv(x.to(memory_format=torch.channels_last), codebooks, codes, None, shape, [1, 1], [0, 0],
                         [1, 1], 1)
        with mock.patch.object(conv_module, "TABLE_BYTES", 2 * 256 * 16 * 4 - 1):  # one image's tables: above it
            conv_module.conv(x, codebooks, codes, None, shape, [1, 1], [0, 0], [1, 1], 1)
    assert len(calls) == int(pays), "only the first call, and only where it pays"
    torch.testing.assert_close(out, F.conv2d(x, weight.view(shape)), rtol=1e-4, atol=1e-4)


class Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(128, 1024, 1, stride=2)  # 0.5 MB: below one block, pays as a pointwise conv
        self.narrow = nn.Conv2d(1024, 512, 1, bias=False)  # saves 1.9x: keeps its expansion
        self.strided = nn.Conv2d(512, 512, 1, stride=(2, 1))  # saves 1.9x, strided: expanded, its input subsampled
        self.padded = nn.Conv2d(512, 1024, 1, padding=1)  # not pointwise

    def forward(self, x):
        return self.padded(self.strided(torch.relu(self.narrow(torch.relu(self.wide(x))))))


def test_convert_fuses_the_pointwise_convs_that_pay_and_matches_the_dense_reference(check):
    model = Pointwise().eval()
    gm = rpq_fx.convert(model, codebook_dim=64)
    fused = [n.name for n in gm.graph.nodes if n.target is CONV]
    assert fused == ["wide", "strided"]
    assert sum(n.target is EXPAND for n in gm.graph.nodes) == 2
    x = torch.randn(2, 128, 9, 8)
    strides = []
    real = conv_module._CONV[2]
    with pointwise_calls() as calls, mock.patch.dict(conv_module._CONV, {2: lambda *a: strides.append(a[3]) or
                                                                        real(*a)}):
        check.matches_dense_reference(model, gm, x)
    assert len(calls) == 1, "wide computes from its codes"
    assert strides == [[1, 1]], "strided convolves its subsampled input"


def test_rpq_conv2d_layer_takes_the_pointwise_path(ref):
    layer = RPQConv2d(128, 1024, 1, num_codebooks=2)
    x = torch.randn(2, 128, 5, 5, requires_grad=True)
    with pointwise_calls() as calls:
        out = layer(x)
    assert len(calls) == 1
    weight = layer.weight().detach()
    x_ref = x.detach().clone().requires_grad_()
    expected = F.conv2d(x_ref, weight, layer.bias.detach())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- other 2-D convolutions, unfolded

@settings(max_examples=30, deadline=None)
@given(dim=st.sampled_from([1, 3, 9]), num_codebooks=st.integers(1, 4), out_channels=st.integers(1, 20),
       kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       batch=st.integers(1, 3), size=st.tuples(st.integers(1, 8), st.integers(1, 8)), shared=st.booleans(),
       seed=st.integers(0, 2**16))
def test_unfolded_conv2d_matches_f_conv2d_on_the_decompressed_weight(ref, dim, num_codebooks, out_channels, kernel,
                                                                   padding, dilation, stride, batch, size, shared,
                                                                   seed):
    row = dim * num_codebooks
    assume(row % (kernel[0] * kernel[1]) == 0)
    in_channels = row // (kernel[0] * kernel[1])
    assume(all(size[i] + 2 * padding[i] >= dilation[i] * (kernel[i] - 1) + 1 for i in range(2)))
    generator = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(1 if shared else num_codebooks, 16, dim, generator=generator)
    codes = torch.randint(0, 16, (num_codebooks, out_channels), generator=generator, dtype=torch.uint8)
    bias = torch.randn(out_channels, generator=generator)
    shape = [out_channels, in_channels, *kernel]
    x = torch.randn(batch, in_channels, *size, generator=generator)
    expected = F.conv2d(x, ref.expand(codebooks, codes).view(shape), bias, stride, padding, dilation)
    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, codes, bias, shape, list(stride), list(padding), list(dilation), 1)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()))


def test_unfolded_gradients_gradcheck(ref):
    generator = torch.Generator().manual_seed(0)
    codebooks = torch.randn(6, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    codes = torch.randint(0, 4, (6, 5), generator=generator, dtype=torch.uint8)
    bias = torch.randn(5, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)

    def op(x, codebooks, bias):
        return conv_module.conv(x, codebooks, codes, bias, [5, 2, 3, 3], [2, 1], [1, 0], [1, 1], 1)

    with rpq_fx.compute_path("compressed"), pointwise_calls() as calls:
        assert torch.autograd.gradcheck(op, (x, codebooks, bias))
    assert calls


@pytest.mark.parametrize("batch, stride, size, unfolds", [(1, 1, 7, True), (1, 2, 14, True), (2, 1, 7, False)])
def test_a_big_3x3_conv_computes_from_its_codes_only_where_its_input_is_small(ref, batch, stride, size, unfolds):
    """resnet50's layer4 3x3 under RPQ's defaults: unfolded at batch 1 (0.97 ms against 1.33 in blocks), not at 2."""
    codebooks, codes, _, weight = case(ref, 4608, 512, 64, 256, False)
    shape = [512, 512, 3, 3]
    x = torch.randn(batch, 512, size, size)
    with pointwise_calls() as calls:
        out = conv_module.conv(x, codebooks, codes, None, shape, [stride] * 2, [1, 1], [1, 1], 1)
    assert len(calls) == int(unfolds)
    expected = F.conv2d(x, weight.view(shape), None, stride, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
