"""Calibration statistics: what the hooks record is what each layer saw, and the model is left as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rpq_fx
from rpq_fx.fit import collect_stats
from rpq_fx.fit.calibrate import _patches, call_groups
from rpq_fx.passes import capture, plan_conversion


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2), (2, 3, 17)),
    (nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0)), (2, 3, 9, 8)),
    (nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect", bias=False), (1, 2, 7, 7)),
    (nn.Conv3d(2, 3, 2, stride=2, padding=1), (1, 2, 5, 4, 6)),
])
def test_patches_times_the_weight_rows_are_the_convolution(layer, shape):
    x = torch.randn(shape)
    patches = _patches(layer, x)
    rows = layer.weight.detach().reshape(layer.out_channels, -1)
    out = layer(x).detach()
    bias = 0 if layer.bias is None else layer.bias.detach()
    expected = out.movedim(1, -1).reshape(-1, layer.out_channels) - bias
    assert torch.allclose(patches @ rows.t(), expected, atol=1e-5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(600, 16)
        self.fc1 = nn.Linear(16, 512)
        self.norm = nn.BatchNorm1d(512)
        self.fc2 = nn.Linear(512, 300)
        self.drop = nn.Dropout(0.5)

    def forward(self, tokens):
        return self.fc2(self.drop(self.norm(self.fc1(self.embed(tokens).mean(1)))))


def test_statistics_are_the_inputs_each_layer_saw_and_the_model_is_untouched():
    net = Net().train()
    batches = [torch.randint(0, 600, (8, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = copy.deepcopy(net.state_dict())
    plans = plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4))
    stats = collect_stats(net, plans, batches, progress=False)
    assert net.training and all(m.training for m in net.modules()), "modes are given back"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "BatchNorm statistics untouched"
    assert not any(m._forward_pre_hooks for m in net.modules()), "hooks are removed"
    tokens = torch.cat([b.reshape(-1) for b in batches])
    assert torch.equal(stats["embed.weight"].row_counts, torch.bincount(tokens, minlength=600).double())
    net.eval()
    with torch.no_grad():
        x = torch.cat([net.embed(b).mean(1) for b in batches]).double()
        hidden = torch.cat([net.norm(net.fc1(net.embed(b).mean(1))) for b in batches]).double()
    assert torch.allclose(stats["fc1.weight"].hessian, x.t() @ x, atol=1e-6)
    assert torch.allclose(stats["fc2.weight"].hessian, hidden.t() @ hidden, rtol=1e-5, atol=1e-4)


def test_replaced_parameters_change_what_later_layers_see_and_layers_are_grouped_by_input():
    net = Net().eval()
    batches = [torch.randint(0, 600, (4, 5))]
    plans = plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4))
    groups, once = call_groups(net, plans, batches[0])
    assert [[p.name for p in g] for g in groups] == [["embed.weight"], ["fc1.weight"], ["fc2.weight"]]
    assert once == {"embed.weight", "fc1.weight", "fc2.weight"}
    zero = torch.zeros_like(net.fc1.weight)
    stats = collect_stats(net, plans, batches, replaced={"fc1.weight": zero}, progress=False)
    with torch.no_grad():
        hidden = net.norm(F.linear(net.embed(batches[0]).mean(1), zero, net.fc1.bias)).double()
    assert torch.allclose(stats["fc2.weight"].hessian, hidden.t() @ hidden, atol=1e-5)
    assert not torch.equal(net.fc1.weight, zero), "the model's own weight is not touched"


def test_stopping_each_forward_at_the_last_layer_of_interest_gives_the_same_statistics():
    net = Net().eval()
    batches = [torch.randint(0, 600, (4, 5), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plans = [p for p in plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4)) if p.name != "fc2.weight"]
    calls = []
    net.fc2.register_forward_hook(lambda *args: calls.append(1))
    full = collect_stats(net, plans, batches, progress=False)
    assert len(calls) == 2
    early = collect_stats(net, plans, batches, stop_early=True, progress=False)
    assert len(calls) == 2, "the forward ended at fc1: fc2 did not run"
    assert torch.equal(full["fc1.weight"].hessian, early["fc1.weight"].hessian)
    assert torch.equal(full["embed.weight"].row_counts, early["embed.weight"].row_counts)
