"""Calibration statistics: what the hooks record is what each layer saw, and the model is left as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx.fit import collect_stats
from rpq_fx.fit.calibrate import LayerStats, _conv_inputs, _patches, call_groups
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


def relative_hessian(x: torch.Tensor, weight: torch.Tensor, calls: int) -> torch.Tensor:
    """``Σ x xᵀ / ||W x||²`` over the rows of ``x`` (one call's rows after another), the energy
    floored at 1% of its median in each call, as documented."""
    total = 0
    for chunk in x.double().chunk(calls):
        energy = (chunk @ weight.detach().double().t()).pow(2).sum(1)
        total = total + (chunk.t() / energy.clamp_min(0.01 * energy.median())) @ chunk
    return total


def assert_sums(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Statistics summed in float32 (the model's dtype), within float32's rounding of the float64 reference."""
    assert actual.dtype == torch.float32
    assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


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
    assert_sums(stats["fc1.weight"].hessian, relative_hessian(x, net.fc1.weight, 3))
    assert_sums(stats["fc2.weight"].hessian, relative_hessian(hidden, net.fc2.weight, 3))


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
    assert_sums(stats["fc2.weight"].hessian, relative_hessian(hidden, net.fc2.weight, 1))
    assert not torch.equal(net.fc1.weight, zero), "the model's own weight is not touched"


def test_asymmetric_statistics_pair_each_quantised_input_with_the_dense_one():
    net = Net().eval()
    batches = [torch.randint(0, 600, (4, 5), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plans = [p for p in plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4)) if p.name == "fc2.weight"]
    noisy = net.fc1.weight.detach() + 0.1 * torch.randn_like(net.fc1.weight)
    stats = collect_stats(net, plans, batches, replaced={"fc1.weight": noisy}, asymmetric=True, progress=False)
    hessian = cross = 0
    with torch.no_grad():
        for b in batches:
            x = net.embed(b).mean(1)
            dense = net.norm(net.fc1(x)).double()
            quantised = net.norm(F.linear(x, noisy, net.fc1.bias)).double()
            energy = (dense @ net.fc2.weight.double().t()).pow(2).sum(1)  # the dense model's output weighs each row
            weight = 1 / energy.clamp_min(0.01 * energy.median())
            hessian = hessian + (quantised.t() * weight) @ quantised
            cross = cross + (dense.t() * weight) @ quantised
    assert_sums(stats["fc2.weight"].hessian, hessian)
    assert_sums(stats["fc2.weight"].cross, cross)
    assert not torch.allclose(cross, hessian, rtol=1e-2), "the pairs differ: fc1's change reaches fc2"
    assert collect_stats(net, plans, batches, asymmetric=True, progress=False)["fc2.weight"].cross is None, \
        "nothing quantised before: the inputs are the dense ones, no second pass"


class Branchy(nn.Module):
    """Calls ``fc2`` twice where ``fc1``'s output is large: the dense and the quantised model may differ."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        h = self.fc1(x)
        out = self.fc2(h)
        return out + self.fc2(h) if h.abs().mean() > 1 else out


@pytest.mark.parametrize("scale", [10.0, 0.0], ids=["dense-calls-once", "dense-calls-twice"])
def test_calls_that_do_not_pair_up_leave_the_statistics_symmetric(scale):
    net = Branchy().eval()
    with torch.no_grad():
        net.fc1.weight.fill_(0.5)
        net.fc1.bias.zero_()
    x = [torch.full((4, 64), 0.01)]  # dense |h| = 0.32: fc2 called once
    if not scale:
        x = [torch.full((4, 64), 0.1)]  # dense |h| = 3.2: twice; quantised (fc1 = 0) once
    straight = nn.Sequential()  # reason: fx cannot trace the branch; plans of a model with the same layer names
    straight.fc1, straight.fc2 = net.fc1, net.fc2
    plans = [p for p in plan_conversion(capture(straight), straight, rpq_fx.RPQConfig(codebook_dim=4, num_codes=4))
             if p.name == "fc2.weight"]
    stats = collect_stats(net, plans, x, replaced={"fc1.weight": net.fc1.weight.detach() * scale}, asymmetric=True,
                          progress=False)["fc2.weight"]
    assert stats.unpaired and stats.cross is None
    assert stats.hessian is not None


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


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_statistics_weigh_each_patch_by_its_groups_output_energy(groups):
    layer = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 4, 5, 5)
    patches, energy = _conv_inputs(layer, x)
    out = layer(x).detach().movedim(1, -1)  # [B, H, W, out]
    expected = out.reshape(-1, groups, 6 // groups).pow(2).sum(-1).reshape(-1)
    assert patches.shape[0] == energy.shape[0] == 2 * 25 * groups
    assert torch.allclose(energy, expected, rtol=1e-4, atol=1e-5)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(600, 16)
        self.fc = nn.Linear(16, 600)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.embed(input_ids)) * attention_mask.unsqueeze(-1)


def test_padding_positions_of_a_dict_input_are_left_out():
    net = Tokens().eval()
    ids = torch.randint(1, 600, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    padded = ids.clone()
    padded[0, 4:] = 0  # whatever the padding holds must not count
    plans = plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4))
    stats = collect_stats(net, plans, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    real = padded[mask.bool()]
    assert torch.equal(stats["embed.weight"].row_counts, torch.bincount(real, minlength=600).double())
    with torch.no_grad():
        x = net.embed(real)
    assert_sums(stats["fc.weight"].hessian, relative_hessian(x, net.fc.weight, 1))


def test_scaling_an_input_row_does_not_change_its_weight_in_the_statistics():
    net = nn.Sequential(nn.Linear(16, 600, bias=False)).eval()
    x = torch.randn(32, 16)
    scaled = x.clone()
    scaled[:4] *= 1000  # massive activations on a few rows
    plans = plan_conversion(capture(net), net, rpq_fx.RPQConfig(codebook_dim=4))
    plain = collect_stats(net, plans, [x], progress=False)["0.weight"].hessian
    big = collect_stats(net, plans, [scaled], progress=False)["0.weight"].hessian
    assert torch.allclose(plain, big, rtol=1e-5, atol=1e-7)  # float32 energies


@settings(max_examples=10, deadline=None)
@given(items=st.integers(50, 400), width=st.sampled_from([8, 48]), spread=st.floats(0.0, 4.0), seed=st.integers(0, 99))
def test_float32_sums_over_many_items_stay_within_float32_rounding_of_float64(items, width, spread, seed):
    # the Gram matrix is summed in float32, item after item: its error must not grow with the number of items
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, width, generator=g)
    mix = torch.randn(width, width, generator=g) + torch.eye(width)
    xs = [torch.randn(16, width, generator=g) @ mix * float(10 ** (spread * torch.rand(1, generator=g)))
          for _ in range(items)]
    stats = LayerStats()
    for x in xs:
        stats.add_inputs(x, (x @ weight.t()).pow(2).sum(-1))
    expected = sum(relative_hessian(x, weight, 1) for x in xs)
    assert stats.hessian.dtype == torch.float32
    assert float((stats.hessian.double() - expected).norm() / expected.norm()) < 2e-6
