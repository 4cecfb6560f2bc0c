"""The conversion record (issue 20 item 2): one type, one accessor, for a traced result and a model
converted in place alike, surviving pickling, deepcopy and torch.save (then save still works)."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx.record import ConversionRecord, conversion_record
from test_io_format1 import (FIXTURE, IN_PLACE_FIXTURE, IN_PLACE_INPUT, Format1InPlace, Format1Net,
                             assert_saved_outputs)


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "deepcopy": copy.deepcopy,
          "torch.save": _torch_save_load}


def _traced():
    return rpq_fx.load(Format1Net().eval(), FIXTURE)


def _in_place():
    return rpq_fx.load(Format1InPlace().eval(), IN_PLACE_FIXTURE)


@pytest.mark.parametrize("build", [_traced, _in_place], ids=["traced", "in place"])
def test_one_record_type_for_both_result_shapes(build):
    model = build()
    record = conversion_record(model)
    assert isinstance(record, ConversionRecord)
    assert record.config == rpq_fx.RPQConfig.from_dict(rpq_fx.checkpoint_info(FIXTURE if build is _traced
                                                                                else IN_PLACE_FIXTURE)["config"])
    assert [layer.name for layer in record.layers if layer.converted] == (
        ["conv.weight", "fc1.weight"] if build is _traced else ["fc.weight", "head.weight"])
    assert record.path.startswith("torch.fx" if build is _traced else "in place")
    assert model.rpq_layers == list(record.layers) and model.rpq_config is record.config  # the legacy views
    assert rpq_fx.report(model).totals["path"] == record.path
    assert conversion_record(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("how", COPIES)
def test_traced_result_keeps_record_graphs_and_outputs(tmp_path, how):
    model = _traced()
    copied = COPIES[how](model)
    assert isinstance(copied, rpq_fx.RPQGraphModule)
    assert conversion_record(copied) == conversion_record(model)
    assert_saved_outputs(copied)  # both modes: the train-only branch survived too
    path = rpq_fx.save(copied, tmp_path / "again.safetensors")
    assert_saved_outputs(rpq_fx.load(Format1Net(), path))


@pytest.mark.parametrize("how", COPIES)
def test_in_place_result_keeps_record_and_outputs(tmp_path, how):
    model = _in_place()
    copied = COPIES[how](model)
    assert type(copied) is Format1InPlace
    assert conversion_record(copied) == conversion_record(model)
    with torch.no_grad():
        for x in (IN_PLACE_INPUT, -IN_PLACE_INPUT):
            assert torch.equal(copied(x), model(x))
    path = rpq_fx.save(copied, tmp_path / "again.safetensors")
    assert rpq_fx.checkpoint_report(path).rows == rpq_fx.checkpoint_report(IN_PLACE_FIXTURE).rows
