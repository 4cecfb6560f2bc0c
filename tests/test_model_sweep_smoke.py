"""The model sweep's own code (benchmarks/model_sweep.py), on a few small models, so CI runs it.

The full sweep is a script (``python benchmarks/model_sweep.py``); here its per-model function runs on
three timm models (on the default capture path) and three Hugging Face models (in place and through
torch.export), and every row must pass: converted, compared with the decompressed dense reference.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("model_sweep", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep runs: on shared cores, 2 threads can stall each other
    yield
    torch.set_num_threads(threads)


def _assert_row_passes(sweep, row, path_prefix):
    assert row["error"] is None, row["error"]
    assert row["path"].startswith(path_prefix), row["path"]
    for label, result in row["results"].items():
        assert result["error"] is None, f"{label}: {result['error']}"
        assert not result["unlisted"], f"{label}: weights missing from the report: {result['unlisted']}"
        assert result["converted"] >= 1 and result["ratio"] > 1.0, (label, result)
        assert result["max_rel_err"] is not None and result["max_rel_err"] <= sweep.TOLERANCE, (label, result)
    assert row["passed"], row


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224"])
def test_timm_model_passes(sweep, name):
    row = sweep.run_model(name, "default", {"small": sweep.SETTINGS["small"]})
    assert row["source"] == "timm" and row["family"] == dict(sweep.TIMM_MODELS)[name]
    _assert_row_passes(sweep, row, "torch.fx")
    # nearly every weight converts with small codebooks
    small = row["results"]["small"]
    assert small["converted"] >= 0.8 * small["layers"], small


@pytest.mark.parametrize("capture, path", [("default", "in place"), ("export", "torch.export")])
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_hugging_face_model_passes(sweep, name, capture, path):
    row = sweep.run_model(name, capture, {"small": sweep.SETTINGS["small"]})
    assert row["source"] == "transformers"
    _assert_row_passes(sweep, row, path)
    small = row["results"]["small"]
    assert small["converted"] >= 0.9 * small["layers"], small


def test_rpq_defaults_setting_and_table(sweep, tmp_path):
    """The RPQ-defaults column (rpq_fx.RPQ) and the files main() writes."""
    assert sweep.main(["--only", "gpt2", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "model_sweep.json").read_text())
    assert [(r["model"], r["capture"]) for r in data["rows"]] == [("gpt2", "default"), ("gpt2", "export")]
    assert all(r["passed"] and set(r["results"]) == set(sweep.SETTINGS) for r in data["rows"])
    table = (tmp_path / "model_sweep.md").read_text()
    assert "1 models (0 timm, 1 Hugging Face), 1 pass on every path; 2 rows, 2 pass, 0 fail" in table
    assert "benchmarks/model_sweep.py --only gpt2" in table


def test_comparison_measures_relative_error_and_refuses_a_zero_reference(sweep):
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    scale = expected.abs().max().item()
    err, got_scale = sweep._relative_error({"logits": expected + 1e-3 * scale}, {"logits": expected})
    assert got_scale == scale and err == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(AssertionError, match="~0"):
        sweep._relative_error(torch.full((2, 3), 1e-7) * expected, expected * 1e-7)
    with pytest.raises(AssertionError, match="shape"):
        sweep._relative_error(expected[:1], expected)
