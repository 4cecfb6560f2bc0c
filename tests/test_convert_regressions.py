"""Cases the model sweep found, each reduced to a few lines and checked against the dense reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rpq_fx

SETTINGS = dict(max_codebook_dim=16, num_codes=16)


class TwoModesFunctional(nn.Module):
    """Traces differently per mode and reads a weight functionally (ghostnet, swinv2, eva02)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 32))

    def forward(self, x):
        y = F.linear(x, self.w)
        if self.training:
            y = y * 2
        return y


@pytest.mark.parametrize("training", [True, False])
def test_two_mode_model_with_a_functional_weight(check, training):
    model = TwoModesFunctional().train(training)
    converted = rpq_fx.convert(model, **SETTINGS)
    reference = check.dense_reference(model, converted)
    for mode in (True, False):
        x = torch.randn(3, 32)
        with torch.no_grad():
            check.outputs_close(converted.train(mode)(x), reference.train(mode)(x))


class PositionalEmbedding(nn.Embedding):
    """An Embedding subclass whose forward tests a None default (BART's learned positions)."""

    def forward(self, ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        return super().forward(position_ids + 2)


class Untraceable(nn.Module):
    """Branches on data at the root, so convert rewrites it in place (Whisper, HF ViT, CLIP)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 32, 3, stride=2)
        self.proj = nn.Linear(32, 48)
        self.positions = PositionalEmbedding(40, 48)

    def forward(self, x, ids):
        if x.abs().sum() >= 0:
            h = self.conv(x)[..., :: self.conv.stride[0]]  # reads a layer attribute
            h = self.proj(h.transpose(1, 2).to(self.proj.weight.dtype))  # asks a weight its dtype
            return h.mean(1, keepdim=True) + self.positions(ids)
        return x


def test_in_place_layers_keep_attributes_dtype_and_untraced_optional_arguments(check):
    model = Untraceable()
    converted = rpq_fx.convert(model, **SETTINGS)
    assert converted.rpq_path.startswith("in place")
    assert all(layer.converted for layer in converted.rpq_layers), rpq_fx.report(converted)
    x, ids = torch.randn(2, 16, 21), torch.randint(0, 30, (2, 5))
    check.matches_dense_reference(model, converted, x, ids)
    with torch.no_grad():  # the optional argument given, too
        reference = check.dense_reference(model, converted)
        positions = torch.randint(0, 30, (2, 5))
        check.outputs_close(converted.positions(ids, positions), reference.positions(ids, positions))


def test_emptied_leaf_modules_follow_train_and_eval(check):
    model = nn.Sequential(nn.Linear(32, 64), nn.MultiheadAttention(64, 4, dropout=0.5, batch_first=True))

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            h = self.inner[0](x)
            return self.inner[1](h, h, h, need_weights=False)[0]

    original = Attend()
    converted = rpq_fx.convert(original, **SETTINGS)
    shell = converted.inner.get_submodule("1").module
    assert isinstance(shell, nn.MultiheadAttention) and not list(shell.parameters())
    converted.eval()
    assert not shell.training
    reference = check.dense_reference(original, converted).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        check.outputs_close(converted(x), reference(x))  # dropout off: equal, and deterministic
