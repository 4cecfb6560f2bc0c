"""RPQConfig and filter_fn: wrong values are refused up front, naming the value and the layer."""

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx import RPQConfig, RPQConversionError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512))


@pytest.mark.parametrize("key", [3, None, ("0",)])
def test_override_keys_must_be_patterns(key):
    with pytest.raises(ValueError, match=f"keys must be str.*{type(key).__name__}"):
        RPQConfig(num_codebooks=4, overrides={key: {"num_codes": 16}})


def test_overrides_must_be_a_dict():
    with pytest.raises(ValueError, match="overrides must be a dict"):
        RPQConfig(num_codebooks=4, overrides=[("0", {"num_codes": 16})])


def test_an_override_that_matches_nothing_warns_and_fails_under_strict():
    config = RPQConfig(num_codebooks=4, overrides={"2": {"num_codes": 16}, "fc9*": {"skip": True}})
    with pytest.warns(UserWarning, match=r"\['fc9\*'\] match no weight or layer of Sequential"):
        rpq_fx.convert(_mlp(), config=config, progress=False)
    with pytest.raises(RPQConversionError, match=r"\['fc9\*'\]"):
        rpq_fx.convert(_mlp(), config=config, strict=True, progress=False)


def test_overrides_that_match_say_nothing(recwarn):
    # a pattern for a layer left dense by filter_fn, or for the weight's name, still counts as a match
    config = RPQConfig(num_codebooks=4, overrides={"0": {"num_codes": 16}, "2.weight": {"num_codes": 32}})
    rpq_fx.convert(_mlp(), config=config, filter_fn=lambda layer, name: name != "0", progress=False)
    assert not [w for w in recwarn if "match no weight" in str(w.message)]


@pytest.mark.parametrize("answer", ["no", 0, 1, None, torch.tensor(True)])
def test_filter_fn_must_return_a_bool(answer):
    model = _mlp()
    with pytest.raises(TypeError, match=r"filter_fn must return True or False, got .* for '0'"):
        rpq_fx.convert(model, num_codebooks=4, filter_fn=lambda layer, name: answer, progress=False)
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
