"""allocate's budget is refused up front, before minutes of measuring, unless it is a finite number > 0."""

import math
import re

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx.allocate import SizeCosts, SizeOption


@pytest.mark.parametrize("bits", [0, -1, float("nan"), float("inf"), True, "2", None])
def test_allocate_and_size_costs_config_refuse_a_bad_budget_naming_it(bits):
    finite = ", which is not finite" if isinstance(bits, float) and not math.isfinite(bits) else ""
    message = re.escape(f"allocate: bits must be a number > 0, got {bits!r}{finite}")
    model = nn.Linear(16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        rpq_fx.allocate(model, bits, [torch.randn(4, 16)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    costs = SizeCosts(rpq_fx.RPQConfig(codebook_dim=4), [{"codebook_dim": 4}],
                      {"weight": [SizeOption({"codebook_dim": 4}, 1024.0, 0.5)]}, {"weight": 256})
    with pytest.raises(ValueError, match=message):
        costs.config(bits)
    assert costs.config(4.0).overrides == {"weight": {"codebook_dim": 4}}
