"""RPQConfig and filter_fn: wrong values are refused up front, naming the value and the layer."""

import dataclasses
import fractions
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rpq_fx
import rpq_fx.config
from rpq_fx import LayerSettings, RPQConfig, RPQConversionError
from rpq_fx.config import SPLITS, check_float, without_new_defaults


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


# ---------------------------------------------------------------------------------------------------
# per-layer settings are declared once, in LayerSettings (issue 20 item 1)

# a valid value other than the default for every setting (with what it needs beside it)
OTHER_VALUES = {"num_codebooks": ({"num_codebooks": 8}, {}), "codebook_dim": ({"codebook_dim": 4}, {}),
                "max_codebook_dim": ({"max_codebook_dim": 16}, {}), "num_codes": ({"num_codes": 16}, {}),
                "shared_codebooks": ({"shared_codebooks": True}, {}), "init": ({"init": "kmeans"}, {}),
                "codebook_dtype": ({"codebook_dtype": "float16"}, {}),
                "error_feedback": ({"error_feedback": False}, {}), "damp": ({"damp": 0.5}, {}),
                "asymmetric": ({"asymmetric": False}, {}), "hot_rows": ({"hot_rows": 4}, {"hot_codebook_dim": 4}),
                "hot_codebook_dim": ({"hot_codebook_dim": 8}, {}),
                "additive_codebooks": ({"additive_codebooks": 2}, {})}
SETTINGS = [f.name for f in dataclasses.fields(LayerSettings)]


def test_every_layer_setting_is_a_config_field_with_its_default():
    config_fields = {f.name: f for f in dataclasses.fields(RPQConfig)}
    assert [f.name for f in dataclasses.fields(RPQConfig)] == [*SETTINGS, "checkpoint", "seed", "overrides"]
    for f in dataclasses.fields(LayerSettings):
        assert (config_fields[f.name].default, config_fields[f.name].type) == (f.default, f.type), f.name
    assert set(OTHER_VALUES) == set(SETTINGS), "give the new setting a value in OTHER_VALUES"


@pytest.mark.parametrize("name", SETTINGS)
def test_every_layer_setting_is_overridable_per_layer(name):
    value, needs = OTHER_VALUES[name]
    split = {"codebook_dim": 2} if name == "num_codebooks" else {"num_codebooks": 4}
    config = RPQConfig(**split, overrides={"fc*": {**value, **needs}})
    layer, default = config.settings_for("fc1.weight", "fc1"), config.settings_for("out.weight", "out")
    assert getattr(layer, name) == value[name] != getattr(default, name)
    assert RPQConfig.from_dict(config.to_dict()) == config
    everywhere = RPQConfig(**({} if name in SPLITS else split), **value, **needs)
    assert getattr(everywhere.settings_for("out.weight", "out"), name) == value[name]


def test_a_setting_added_to_layer_settings_needs_no_other_edit(monkeypatch):
    # config.py with one line added to LayerSettings: RPQConfig takes it, its overrides accept it, and
    # settings_for and to_dict / from_dict carry it
    source = Path(rpq_fx.config.__file__).read_text()
    anchor = "    hot_codebook_dim: int | None = _size(None)\n"
    assert anchor in source
    module = types.ModuleType("rpq_fx_config_plus")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source.replace(anchor, anchor + "    knob: int = 3\n"), "config_plus.py", "exec"), vars(module))
    config = module.RPQConfig(codebook_dim=4, overrides={"fc1": {"knob": 5}})
    assert config.knob == 3
    assert config.settings_for("fc1.weight", "fc1").knob == 5 and config.settings_for("fc2.weight", "fc2").knob == 3
    assert module.RPQConfig.from_dict(config.to_dict()) == config and config.to_dict()["knob"] == 3
    assert "knob" in module.LAYER_SETTINGS and "knob" not in module.SIZE_SETTINGS


def test_layer_settings_check_themselves_and_are_immutable():
    with pytest.raises(ValueError, match="LayerSettings: set exactly one of"):
        LayerSettings()
    with pytest.raises(ValueError, match=r"LayerSettings: damp must be a number > 0, got 0"):
        LayerSettings(codebook_dim=4, damp=0)
    settings = LayerSettings(codebook_dim=4, codebook_dtype=torch.float16)
    assert settings.codebook_dtype == "float16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_codes = 16
    config = RPQConfig(codebook_dim=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_codes = 1  # would skip the checks: a config is changed by dataclasses.replace, which checks
    with pytest.raises(ValueError, match="num_codes must be an int in"):
        dataclasses.replace(config, num_codes=1)


def test_a_plan_holds_the_resolved_settings():
    config = RPQConfig(num_codebooks=4, overrides={"2": {"codebook_dim": 8, "init": "kmeans", "hot_rows": 600,
                                                         "hot_codebook_dim": 4}})
    converted = rpq_fx.convert(_mlp(), config=config, progress=False)
    plans = {plan.name: plan for plan in converted.rpq_layers}
    assert plans["0.weight"].settings == config.settings_for("0.weight", "0")
    second = plans["2.weight"]
    assert second.settings == config.settings_for("2.weight", "2") and second.settings.init == "kmeans"
    assert (second.num_codebooks, second.codebook_dim, second.hot_rows) == (64, 8, 512)  # hot rows: at most all
    assert not hasattr(second, "init") and not hasattr(second, "fit_error")


@pytest.mark.parametrize("value", [0, 17, True, 2.0, "2"])
def test_additive_codebooks_is_checked(value):
    with pytest.raises(ValueError, match=r"RPQConfig: additive_codebooks must be an int in \[1, 16\], got"):
        RPQConfig(codebook_dim=4, additive_codebooks=value)
    with pytest.raises(ValueError, match=r"overrides\['fc'\]: additive_codebooks must be"):
        RPQConfig(codebook_dim=4, overrides={"fc": {"additive_codebooks": value}})


def test_without_new_defaults_leaves_out_additive_codebooks_at_one_only():
    # what checkpoints write: files from before the setting hold no such key, and a model that does not use it
    # writes the same bytes
    plain, additive = RPQConfig(codebook_dim=4), RPQConfig(codebook_dim=4, additive_codebooks=3)
    assert plain.to_dict()["additive_codebooks"] == 1 and "additive_codebooks" not in without_new_defaults(
        plain.to_dict())
    assert without_new_defaults(additive.to_dict())["additive_codebooks"] == 3
    for config in (plain, additive):
        assert RPQConfig.from_dict(without_new_defaults(config.to_dict())) == config


# ---------------------------------------------------------------------------------------------------
# check_float: the float counterpart of check_int, for every float a user or a file gives

def _message(where: str, name: str, accepted: str, value) -> str:
    """check_float's message, as a regular expression."""
    finite = isinstance(value, float) and not math.isfinite(value)
    return re.escape(f"{where}: {name} must be {accepted}, got {value!r}{', which is not finite' if finite else ''}")


@pytest.mark.parametrize("value", [True, False, float("nan"), float("inf"), float("-inf"), -0.5, "1.0", None, 1j,
                                   torch.tensor(1.0)])
def test_check_float_refuses_what_is_not_a_finite_number_in_range_naming_it(value):
    with pytest.raises(ValueError, match=_message("where", "lr", "a number >= 0", value) + "$"):
        check_float("where", "lr", value, 0)


@pytest.mark.parametrize("value, low, high, low_open, high_open, accepted", [
    (0, 0, None, True, False, "a number > 0"),
    (0.0, 0, 1, True, False, "a number in (0, 1]"),
    (1.0000001, 0, 1, True, False, "a number in (0, 1]"),
    (float("nan"), 0, 1, True, False, "a number in (0, 1]"),
    (1, 0, 1, False, True, "a number in [0, 1)"),
    (-1e-9, 0, 1, False, False, "a number in [0, 1]"),
    (2.5, None, 2, False, False, "a number <= 2"),
    (2, None, 2, False, True, "a number < 2"),
    (float("-inf"), None, 2, False, True, "a number < 2"),
    (float("nan"), None, None, False, False, "a finite number")])
def test_check_float_bounds_open_and_closed(value, low, high, low_open, high_open, accepted):
    with pytest.raises(ValueError, match=_message("f", "x", accepted, value) + "$"):
        check_float("f", "x", value, low, high, low_open=low_open, high_open=high_open)


@pytest.mark.parametrize("value", [0, 0.0, 1, 0.5, 1e-300, np.float32(0.25), np.float64(1.0), fractions.Fraction(1, 3)])
def test_check_float_accepts_finite_numbers_in_range_bounds_included(value):
    check_float("f", "x", value, 0, 1)
    check_float("f", "x", value * 1e30, 0)
    check_float("f", "x", -value, None, 0)


def test_check_float_takes_an_int_past_the_largest_float_as_finite():
    check_float("f", "x", 10**400, 0)
    with pytest.raises(ValueError, match=_message("f", "x", "a number <= 1", 10**400) + "$"):
        check_float("f", "x", 10**400, None, 1)


@pytest.mark.parametrize("damp", [float("nan"), float("inf"), True, "0.1", -0.01, 0])
def test_damp_refuses_non_finite_bool_and_non_positive_values(damp):
    with pytest.raises(ValueError, match=_message("RPQConfig", "damp", "a number > 0", damp)):
        RPQConfig(codebook_dim=4, damp=damp)
    with pytest.raises(ValueError, match=_message("RPQConfig.overrides['fc1']", "damp", "a number > 0", damp)):
        RPQConfig(codebook_dim=4, overrides={"fc1": {"damp": damp}})


def test_with_settings_applies_settings_as_an_override_does_and_checks_them():
    config = RPQConfig(codebook_dim=4, num_codes=16, overrides={"head": {"skip": True}})
    sized = config.with_settings({"num_codebooks": 2, "hot_rows": 8, "hot_codebook_dim": 2})
    assert (sized.num_codebooks, sized.codebook_dim, sized.hot_rows, sized.num_codes) == (2, None, 8, 16)
    assert sized.overrides == config.overrides and config.codebook_dim == 4, "a copy; the config stays"
    with pytest.raises(ValueError, match="RPQConfig: num_codes must be an int in"):
        config.with_settings({"num_codes": 1})
