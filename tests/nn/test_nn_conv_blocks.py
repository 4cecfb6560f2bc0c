"""``RPQConv2d`` / ``RPQConv1d`` with a weight above one block compute through ``rpq_fx::conv``: the same output
and gradients as ``F.conv`` on the expanded weight (the independent dense reference)."""

import pytest
import torch
import torch.nn.functional as F

import rpq_fx.ops.conv as conv_module
from rpq_fx.nn import RPQConv1d, RPQConv2d


@pytest.mark.parametrize("layer, x, functional", [
    (lambda: RPQConv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=2, num_codebooks=6),
     torch.randn(3, 8, 9, 7), lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2)),
    (lambda: RPQConv1d(4, 10, 3, padding=2, dilation=2, bias=False, num_codebooks=4, shared_codebooks=True),
     torch.randn(2, 4, 11), lambda x, w, b: F.conv1d(x, w, b, 1, 2, 2, 1)),
])
def test_blocked_layer_matches_the_expanded_weight(monkeypatch, layer, x, functional):
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 64)  # a few output channels per block
    monkeypatch.setattr(conv_module, "INPUT_RATIO", 0)  # whatever the input's size
    conv = layer()
    calls = []
    monkeypatch.setattr("rpq_fx.nn.layers.rpq_conv", lambda *a: calls.append(a) or conv_module.conv(*a))
    x = x.requires_grad_()
    out = conv(x)
    assert len(calls) == 1, "the layer computes through rpq_fx::conv"
    weight = conv.weight().detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if conv.bias is None else conv.bias.detach().clone().requires_grad_()
    expected = functional(x_ref, weight, bias_ref)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    expand_grad = torch.autograd.grad(conv.weight(), conv.weight.codebooks, weight.grad)[0]
    torch.testing.assert_close(conv.weight.codebooks.grad, expand_grad)
    if bias_ref is not None:
        torch.testing.assert_close(conv.bias.grad, bias_ref.grad)


def test_small_or_padded_layers_keep_torch_s_conv(monkeypatch):
    calls = []
    monkeypatch.setattr("rpq_fx.nn.layers.rpq_conv", lambda *a: calls.append(a))
    RPQConv2d(8, 12, 3, num_codebooks=6)(torch.randn(1, 8, 5, 5))  # below one block
    monkeypatch.setattr(conv_module, "BLOCK_BYTES", 64)
    RPQConv2d(8, 12, 3, padding=1, padding_mode="reflect", num_codebooks=6)(torch.randn(1, 8, 5, 5))
    RPQConv2d(8, 12, 3, padding="same", num_codebooks=6)(torch.randn(1, 8, 5, 5))
    assert not calls
