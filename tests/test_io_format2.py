"""Checkpoint format 2 (issue 20 item 1): each layer record holds its plan, its settings and how its
weight was filled, apart; format-1 files read into the same record; the fit returns its outcome."""

import dataclasses

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx.config import without_new_defaults
from rpq_fx import LayerSettings, RPQCheckpointError, conversion_record
from rpq_fx.io import FORMAT_VERSION
from rpq_fx.record import FitOutcome
from test_io_format1 import FIXTURE, IN_PLACE_FIXTURE, Format1InPlace, Format1Net, assert_saved_outputs
from test_io_hostile import craft

LAYER_KEYS = {"name", "aliases", "ops", "shape", "dtype", "transposed", "padding_rows", "reason", "excluded",
              "num_codebooks", "codebook_dim", "settings", "filled", "fit_error"}


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 16, padding_idx=0)
        self.fc = nn.Linear(16, 300)
        self.small = nn.Linear(16, 4)

    def forward(self, t):
        h = self.emb(t)
        return self.fc(h), self.small(h)


def _fitted(tmp_path):
    torch.manual_seed(0)
    model = Embedder().eval()  # trained-like values: the seeded default init
    config = rpq_fx.RPQConfig(codebook_dim=4, num_codes=32, init="kmeans", hot_rows=8, hot_codebook_dim=2,
                              overrides={"fc": {"init": "random", "damp": 0.5, "codebook_dtype": "bfloat16"}})
    converted = rpq_fx.convert(model, config=config, calibration=[torch.randint(0, 300, (4, 9))], progress=False)
    return converted, rpq_fx.save(converted, tmp_path / "m.safetensors")


def test_format2_stores_plan_settings_and_outcome_apart_and_round_trips(tmp_path):
    converted, path = _fitted(tmp_path)
    info = rpq_fx.checkpoint_info(path)
    assert info["format_version"] == 2 == FORMAT_VERSION
    records = {r["name"]: r for r in info["layers"]}
    assert all(set(r) == LAYER_KEYS for r in records.values())
    record = conversion_record(converted)
    for plan in record.layers:
        saved = records[plan.name]
        # a setting added since format 2 was first written is left out at its no-op default (additive_codebooks=1)
        assert saved["settings"] == (without_new_defaults(dataclasses.asdict(plan.settings)) if plan.converted else None)
        assert "additive_codebooks" not in (saved["settings"] or {})
        fit = record.fits.get(plan.name)
        assert (saved["filled"], saved["fit_error"]) == ((fit.filled, fit.error) if fit else (None, None))
    assert records["emb.weight"]["filled"] == "kmeans+calibration" and records["fc.weight"]["filled"] == "random"
    assert records["fc.weight"]["settings"]["damp"] == 0.5 and records["small.weight"]["settings"] is None
    loaded = rpq_fx.load(Embedder().eval(), path)
    assert conversion_record(loaded) == record  # settings (the init asked for too), split and outcomes
    t = torch.randint(0, 300, (2, 5))
    assert all(torch.equal(a, b) for a, b in zip(loaded(t), converted(t)))
    assert rpq_fx.checkpoint_report(path).rows == rpq_fx.report(converted).rows


def test_a_format2_record_without_a_later_setting_loads_with_its_default(tmp_path):
    converted, path = _fitted(tmp_path)

    def drop(info):
        for r in info["layers"]:
            if r["settings"] is not None:
                del r["settings"]["asymmetric"]  # as if the setting had been added after the file was written
    loaded = rpq_fx.load(Embedder().eval(), craft(tmp_path / "old.safetensors", path, edit=drop))
    assert conversion_record(loaded) == conversion_record(converted)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["settings"].update(frobnicate=1), r"layers\[0\]\.settings must be an object of the settings"),
    (lambda r: r["settings"].update(damp=0), r"layers\[0\]\.settings: LayerSettings: damp must be a number > 0"),
    (lambda r: r["settings"].update(num_codes=1), r"layers\[0\]\.settings: LayerSettings: num_codes must be"),
    (lambda r: r.update(settings=None), r"layers\[0\]\.settings \(a converted weight\) must be set"),
    (lambda r: r.update(filled="by hand"), r"layers\[0\]\.filled must be null or one of random, kmeans"),
    (lambda r: r.update(codebook_dim=None), r"layers\[0\]\.codebook_dim \(a converted weight\) must be set"),
    (lambda r: r.update(init="kmeans"), r"layers\[0\] must be an object of exactly name, aliases"),
    (lambda r: r.pop("excluded"), r"layers\[0\] must be an object of exactly"),
])
def test_crafted_format2_records_are_checkpoint_errors(tmp_path, edit, message):
    _, path = _fitted(tmp_path)
    path = craft(tmp_path / "bad.safetensors", path, edit=lambda info: edit(info["layers"][0]))
    for read in (rpq_fx.checkpoint_info, rpq_fx.checkpoint_report, lambda p: rpq_fx.load(Embedder(), p)):
        with pytest.raises(RPQCheckpointError, match=message):
            read(path)


@pytest.mark.parametrize("fixture, build", [(FIXTURE, Format1Net), (IN_PLACE_FIXTURE, Format1InPlace)])
def test_a_format1_file_reads_into_the_same_record_and_saves_as_format2(tmp_path, fixture, build):
    loaded = rpq_fx.load(build().eval(), fixture)
    record = conversion_record(loaded)
    saved = {r["name"]: r for r in rpq_fx.checkpoint_info(fixture)["layers"]}
    for plan in record.layers:
        if plan.converted:
            assert record.fits[plan.name] == FitOutcome(saved[plan.name]["init"], saved[plan.name]["fit_error"])
            assert isinstance(plan.settings, LayerSettings) and plan.settings.num_codes == saved[plan.name]["num_codes"]
        else:
            assert plan.settings is None and plan.name not in record.fits
    again = rpq_fx.save(loaded, tmp_path / "again.safetensors")
    assert rpq_fx.checkpoint_info(again)["format_version"] == 2
    assert rpq_fx.checkpoint_report(again).rows == rpq_fx.checkpoint_report(fixture).rows
    reloaded = rpq_fx.load(build().eval(), again)
    assert conversion_record(reloaded) == record
    if build is Format1Net:
        assert_saved_outputs(reloaded)


def test_the_fit_returns_an_immutable_outcome_and_leaves_the_plans_alone():
    from rpq_fx.fit import fit_weights
    from rpq_fx.passes import capture, new_weights, plan_conversion

    model = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    config = rpq_fx.RPQConfig(codebook_dim=4, num_codes=16, init="kmeans", overrides={"0": {"init": "random"}})
    plans = plan_conversion(capture(model), model, config)
    before = [dataclasses.replace(plan) for plan in plans]
    fits = fit_weights(model, plans, new_weights(plans), progress=False)
    assert plans == before
    assert list(fits) == ["2.weight"] and fits["2.weight"].filled == "kmeans" and 0 < fits["2.weight"].error < 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        fits["2.weight"].error = 0.0
