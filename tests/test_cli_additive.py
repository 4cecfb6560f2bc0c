"""rpq-fx convert --additive-codebooks: M summed codes per slice, from the command line."""

import json
import sys
import textwrap

import pytest
import torch

import rpq_fx
from rpq_fx import cli

MODELS = textwrap.dedent("""
    import torch
    from torch import nn


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 300), nn.ReLU(), nn.Linear(300, 280))
""")


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / "cli_additive_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_additive_models", None)
    import cli_additive_models

    return cli_additive_models


def test_convert_with_additive_codebooks_saves_m_stages(capsys, models, tmp_path):
    out = tmp_path / "out"
    code = cli.main(["convert", "cli_additive_models:net", "--codebook-dim", "8", "--num-codes", "16",
                     "--additive-codebooks", "2", "--init", "kmeans", "--quiet", "--no-graph", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert rpq_fx.checkpoint_info(out / "model.safetensors")["config"]["additive_codebooks"] == 2
    dense = models.net()
    loaded = rpq_fx.load(models.net(), out / "model.safetensors")
    weights = dict(rpq_fx.nn.weight.rpq_weights(loaded))
    assert weights and all(w.additive_codebooks == 2 for w in weights.values())
    # an independent dense reference: each weight the sum of its stages, by plain indexing
    reference = models.net()
    with torch.no_grad():
        for name, w in weights.items():
            rows = sum(stage.codebooks[torch.arange(w.num_codebooks)[:, None], stage.codes.long()]
                       .permute(1, 0, 2).reshape(w.num_vectors, -1) for stage in w.stages())
            reference.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(rows)
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), reference(x), atol=1e-5, rtol=1e-5)
    for name in weights:  # --init kmeans fitted the stages' sum to the dense weight (random codes: error above 1)
        layer = name.rsplit(".", 1)[0]
        wanted = dense.get_submodule(layer).weight
        assert (wanted - reference.get_submodule(layer).weight).norm() < 0.5 * wanted.norm(), name


def test_a_bad_stage_count_is_refused_by_name(capsys, models, tmp_path):
    code = cli.main(["convert", "cli_additive_models:net", "--codebook-dim", "8", "--additive-codebooks", "0",
                     "--quiet", "--no-graph", "--out", str(tmp_path / "out")])
    assert code != 0
    assert "additive_codebooks" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_config_file_and_the_option_together_are_refused(capsys, models, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(rpq_fx.RPQConfig(codebook_dim=8).to_dict()))
    code = cli.main(["convert", "cli_additive_models:net", "--config", str(tmp_path / "c.json"),
                     "--additive-codebooks", "2", "--out", str(tmp_path / "out")])
    assert code == 1 and "--config sets every setting" in capsys.readouterr().err
