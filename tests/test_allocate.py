"""allocate: sizes per weight within a budget of bits, more bits where a weight costs the model more."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx.allocate import SizeOption, _choose


class TwoBranches(nn.Module):
    """``10 loud(x) + 0.1 quiet(x)``: the same error costs the output 10^4 times more in ``loud``."""

    def __init__(self):
        super().__init__()
        self.loud, self.quiet = nn.Linear(96, 2048), nn.Linear(96, 2048)

    def forward(self, x):
        return 10 * self.loud(x) + 0.1 * self.quiet(x)


def _loss(converted, model, x):
    with torch.no_grad():
        return float(rpq_fx.distillation_loss(converted(x), model(x)))


def test_the_sensitive_weight_gets_more_bits_within_the_budget_and_beats_uniform_sizes():
    torch.manual_seed(0)
    model = TwoBranches().train()
    before = copy.deepcopy(model.state_dict())
    calibration = list(torch.randn(256, 96).split(64))
    sizes = [{"codebook_dim": 8}, {"codebook_dim": 4}, {"codebook_dim": 3}]  # 1.3, 2.2, 2.8 bits per weight
    uniform = rpq_fx.convert(model, codebook_dim=4, shared_codebooks=True, init="kmeans", calibration=calibration,
                             progress=False)
    budget = rpq_fx.report(uniform).totals["bits_per_weight"]
    config = rpq_fx.allocate(model, budget, calibration, sizes=sizes, progress=False)
    assert config.overrides["loud.weight"]["codebook_dim"] < config.overrides["quiet.weight"]["codebook_dim"]
    allocated = rpq_fx.convert(model, config=config, calibration=calibration, progress=False)
    assert rpq_fx.report(allocated).totals["bits_per_weight"] <= budget
    x = torch.randn(512, 96)
    assert _loss(allocated, model, x) < 0.5 * _loss(uniform, model, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "model untouched"


def test_a_generous_budget_takes_the_largest_size_and_the_base_config_settings_stay():
    torch.manual_seed(1)
    model = TwoBranches()
    base = rpq_fx.RPQConfig(codebook_dim=8, shared_codebooks=True, init="kmeans", codebook_dtype="float16",
                            overrides={"quiet": {"skip": True}})
    config = rpq_fx.allocate(model, 16.0, [torch.randn(64, 96)], sizes=[{"codebook_dim": 8}, {"codebook_dim": 2}],
                             config=base, progress=False)
    assert config.overrides == {"quiet": {"skip": True}, "loud.weight": {"codebook_dim": 2}}
    assert config.codebook_dtype == "float16" and config.shared_codebooks
    assert rpq_fx.RPQConfig.from_dict(config.to_dict()) == config


def test_allocate_refuses_bad_input_with_the_value():
    model, calibration = TwoBranches(), [torch.randn(8, 96)]
    with pytest.raises(ValueError, match="bits must be a number > 0, got -1"):
        rpq_fx.allocate(model, -1, calibration)
    with pytest.raises(ValueError, match="calibration is empty"):
        rpq_fx.allocate(model, 2.0, [])
    with pytest.raises(ValueError, match="sizes must be a non-empty sequence of dicts"):
        rpq_fx.allocate(model, 2.0, calibration, sizes=[4])
    with pytest.raises(ValueError, match=r"unknown settings \['skip'\]"):
        rpq_fx.allocate(model, 2.0, calibration, sizes=[{"codebook_dim": 4, "skip": True}])
    with pytest.raises(ValueError, match=r"the smallest sizes take \d+\.\d+ bits per weight, above the budget of 0.5"):
        rpq_fx.allocate(model, 0.5, calibration, sizes=[{"codebook_dim": 4}], progress=False)


def test_one_measurement_allocates_every_budget_as_allocate_does():
    torch.manual_seed(2)
    model, calibration = TwoBranches(), list(torch.randn(128, 96).split(64))
    sizes = [{"codebook_dim": 8}, {"codebook_dim": 4}, {"codebook_dim": 2}]
    costs = rpq_fx.size_costs(model, calibration, sizes=sizes, progress=False)
    assert set(costs.options) == {"loud.weight", "quiet.weight"} and all(len(o) == 3 for o in costs.options.values())
    assert costs.config(1.0e9) == rpq_fx.allocate(model, 1.0e9, calibration, sizes=sizes, progress=False)
    dims = []
    for bits in (costs.smallest_bits, 2.5, 5.0):
        converted = rpq_fx.convert(model, config=costs.config(bits), calibration=calibration, progress=False)
        assert rpq_fx.report(converted).totals["bits_per_weight"] <= bits + 1e-9
        dims.append(costs.config(bits).overrides["loud.weight"]["codebook_dim"])
    assert dims == sorted(dims, reverse=True) and dims[0] == 8 and dims[-1] == 2, dims  # more bits, smaller d
    with pytest.raises(ValueError, match=r"above the budget of 0.1"):
        costs.config(0.1)


def test_a_size_with_hot_rows_is_one_option_and_the_others_keep_none():
    torch.manual_seed(3)
    model, calibration = TwoBranches(), list(torch.randn(128, 96).split(64))
    hot = {"codebook_dim": 8, "hot_rows": 512, "hot_codebook_dim": 4}
    costs = rpq_fx.size_costs(model, calibration, sizes=[hot, {"codebook_dim": 4}], progress=False)
    loud = {o.size["codebook_dim"]: o.bits for o in costs.options["loud.weight"]}
    assert loud[8] == 8 * (256 * 8 * 4 + 12 * 2048 + 256 * 4 * 4 + 24 * 512 + 4 * 512)  # float32 codebooks
    quiet = {o.size["codebook_dim"]: o.bits for o in costs.options["quiet.weight"]}
    assert quiet[8] < quiet[4]
    config = costs.config((loud[4] + quiet[8]) / (2 * 96 * 2048))  # room for the sensitive weight's d=4 only
    assert config.hot_rows == 512 and config.overrides == {
        "loud.weight": {"codebook_dim": 4, "hot_rows": 0, "hot_codebook_dim": None}, "quiet.weight": hot}
    converted = rpq_fx.convert(model, config=config, calibration=calibration, progress=False)
    assert converted.loud.weight.hot is None and converted.quiet.weight.hot.num_vectors == 512


def test_costs_are_measured_on_the_validation_inputs_when_given():
    torch.manual_seed(4)
    model, calibration = TwoBranches(), list(torch.randn(128, 96).split(64))
    validation = [3 * torch.randn(64, 96)]
    costs = rpq_fx.size_costs(model, calibration, sizes=[{"codebook_dim": 8}], validation=validation, progress=False)
    converted = rpq_fx.convert(model, codebook_dim=8, shared_codebooks=True, init="kmeans", calibration=calibration,
                               progress=False)
    for name in ("loud.weight", "quiet.weight"):
        alone = copy.deepcopy(model)
        alone.load_state_dict({name: rpq_fx.decompress(converted)[name]}, strict=False)
        assert costs.options[name][0].cost == pytest.approx(_loss(alone, model, validation[0]), rel=1e-5)
    with pytest.raises(ValueError, match="validation is empty"):
        rpq_fx.size_costs(model, calibration, validation=[], progress=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 64), st.floats(0, 10)), min_size=1, max_size=4), min_size=1,
                max_size=5), st.floats(0, 1))
def test_the_choice_is_within_the_budget_and_never_costs_more_than_the_fewest_bits(weights, slack):
    options = {f"w{i}": [SizeOption({"i": j}, float(b), c) for j, (b, c) in enumerate(found)]
               for i, found in enumerate(weights)}
    fewest = {name: min(found, key=lambda o: (o.bits, o.cost)) for name, found in options.items()}
    most = sum(max(o.bits for o in found) for found in options.values())
    floor = sum(o.bits for o in fewest.values())
    budget = floor + slack * (most - floor)
    chosen = _choose(options, budget)
    assert sum(o.bits for o in chosen.values()) <= budget + 1e-9
    assert sum(o.cost for o in chosen.values()) <= sum(o.cost for o in fewest.values()) + 1e-9
