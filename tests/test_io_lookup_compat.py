"""Checkpoints written before lookup weights load with the forward check on; other forwards are still refused.

Before 6ec7b69 rpq_fx handed an ``nn.Embedding`` subclass run by its own forward (``functional_call``) its weight's
expansion, where it now hands a ``LookupWeight``; before ec0be8d the subclass's plan had no padding row. Both come
from one function, ``weight_ops.reads_rows``, called by the plan and the rewrite pass: with it answering False,
today's ``convert`` writes what the old one wrote. That is how the old files here are made (:func:`_old_file`):
the safetensors metadata that rpq_fx at 6ec7b69^ (a ``git archive`` of it, run with ``RPQ_FX_KERNELS=torch``) wrote
for every model here (the five ``CASES``, ``TwoTables``, the tiny OPT) was identical to these, string for string.
"""

import copy
import hashlib
import json
import sys

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import rpq_fx
from rpq_fx import RPQCheckpointError, RPQConfig
from rpq_fx.io import _structure

from conftest import assert_outputs_close, dense_reference

ROWS, DIM = 600, 32
CASES = {"plain": ({}, {}), "padding row": ({"padding_idx": 1}, {}), "in place": ({}, {"inplace": True}),
         "checkpointed": ({}, {"checkpoint": True}),
         "hot rows, additive": ({}, {"config": RPQConfig(num_codebooks=4, hot_rows=8, hot_codebook_dim=4,
                                                         additive_codebooks=2)})}


class Positions(nn.Embedding):
    """OPT's positional embedding's shape: positions from a mask unless given (a ``None`` default, so fx cannot trace
    it: it runs by its own forward), then ``super().forward``."""

    def forward(self, mask, past: int = 0, positions=None):
        if positions is None:
            positions = (mask.cumsum(1) * mask - 1).long()[:, past:]
        return super().forward(positions + 2)


class Model(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.layer, self.head = Positions(ROWS, DIM, **options), nn.Linear(DIM, 3)

    def forward(self, mask, past: int = 0):
        if mask.sum() < 0:  # reason: untraceable whole, so convert goes module by module (as for HF models)
            return mask
        return self.head(self.layer(mask, past))


def _old_file(monkeypatch, model: nn.Module, path, **options) -> nn.Module:
    """``model`` converted and saved as rpq_fx wrote it before lookup weights (see the module docstring)."""
    with monkeypatch.context() as patch:
        for module in ("rpq_fx.passes.plan", "rpq_fx.passes.rewrite"):
            patch.setattr(sys.modules[module], "reads_rows", lambda layer, name: False)
        converted = rpq_fx.convert(model, progress=False, **({"num_codebooks": 4} if "config" not in options else {}),
                                   **options)
    rpq_fx.save(converted, path)
    return converted


def _edit(path, edit) -> None:
    """Write ``path`` again with its rpq_fx metadata changed by ``edit(info)`` (digest updated): a stand-in for a
    writer that recorded another forward or plan."""
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["rpq_fx"])
    edit(info)
    meta["rpq_fx"] = json.dumps(info, sort_keys=True, separators=(",", ":"))
    meta["rpq_fx_sha256"] = hashlib.sha256(meta["rpq_fx"].encode()).hexdigest()
    safetensors.torch.save_file(tensors, path, meta)


def _saved_code(path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["rpq_fx"])["code"]


def _meta_model(**options) -> nn.Module:
    with torch.device("meta"):
        return Model(**options)


def _lookups(model: nn.Module) -> int:
    return sum(n.target.__name__ == "lookup_weight" for m in model.modules() if isinstance(m, torch.fx.GraphModule)
               for n in m.graph.nodes if callable(n.target) and hasattr(n.target, "__name__"))


@pytest.mark.parametrize("case", CASES)
def test_a_file_written_before_lookup_weights_loads_with_the_check_on(monkeypatch, tmp_path, case):
    layer_options, options = CASES[case]
    torch.manual_seed(0)
    original = Model(**layer_options)
    saved = _old_file(monkeypatch, copy.deepcopy(original) if options.get("inplace") else original,
                      tmp_path / "old.safetensors", **options)
    code = "".join(_saved_code(tmp_path / "old.safetensors").values())
    assert "lookup_weight" not in code and ("checkpoint" in code if options.get("checkpoint") else "expand" in code)
    loaded = rpq_fx.load(_meta_model(**layer_options), tmp_path / "old.safetensors")
    assert _lookups(loaded) == 1, "loading converts as rpq_fx does now: the table is read through a LookupWeight"
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(mask, 1), saved(mask, 1), rtol=0, atol=0)
        assert_outputs_close(loaded(mask, 1), dense_reference(original, loaded)(mask, 1))


def _refused(path, model: nn.Module, match: str) -> None:
    with pytest.raises(RPQCheckpointError, match=match):
        rpq_fx.load(model, path)


def test_an_old_file_that_computes_something_else_is_refused(monkeypatch, tmp_path):
    """The old file's forward compared with this model's as rpq_fx wrote it then: another op is still another op."""
    path = tmp_path / "old.safetensors"
    _old_file(monkeypatch, Model(), path)

    def scaled(info):  # the positional rows scaled before the lookup: another computation
        for key, code in info["code"].items():
            if key.startswith("layer:"):
                info["code"][key] = code.replace("weight_1 = torch.ops.rpq_fx.expand.default(weight_codebooks, "
                                                 "weight_codes)", "weight_1 = torch.ops.rpq_fx.expand.default("
                                                 "weight_codebooks, weight_codes) * 2")
                assert info["code"][key] != code

    _edit(path, scaled)
    _refused(path, _meta_model(), r"forward as rpq_fx wrote it before lookup weights, as the file was differs")
    assert rpq_fx.load(_meta_model(), path, check_forward=False) is not None


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer, self.other = Positions(ROWS, DIM), Positions(ROWS, DIM)

    def forward(self, mask):
        if mask.sum() < 0:  # reason: untraceable whole, as Model
            return mask
        return self.layer(mask) + self.other(mask, 1)[:, :1]


def test_a_file_with_lookup_weights_is_compared_as_written(monkeypatch, tmp_path):
    """A file that has a lookup weight in its forward was written since: its forwards must be this model's exactly,
    so one table read through the old expansion and the other through a lookup weight (no writer's output) is
    refused."""
    torch.manual_seed(1)
    converted = rpq_fx.convert(TwoTables(), num_codebooks=4, progress=False)
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    rpq_fx.save(converted, new)
    with torch.device("meta"):
        loaded = rpq_fx.load(TwoTables(), new)
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded(mask), converted(mask), rtol=0, atol=0)
    _old_file(monkeypatch, TwoTables(), old)
    expansion = _saved_code(old)["layer:train"]
    assert _structure(expansion) != _structure(_saved_code(new)["layer:train"])
    _edit(new, lambda info: info["code"].update({"layer:train": expansion}))
    with torch.device("meta"):
        _refused(new, TwoTables(), r"\(layer in eval mode\) forward differs at operation 3: saved `torch.ops.rpq_fx"
                                   r".expand.default\(self.weight.codebooks, self.weight.codes\)`, here `\w+lookup")


def test_an_old_file_with_another_padding_row_is_refused(monkeypatch, tmp_path):
    """An old file may lack the subclass's own padding row, never have another one."""
    path = tmp_path / "old.safetensors"
    _old_file(monkeypatch, Model(padding_idx=1), path)

    def other_row(info):
        (layer,) = [r for r in info["layers"] if r["name"] == "layer.weight"]
        assert layer["padding_rows"] == []
        layer["padding_rows"] = [5]

    _edit(path, other_row)
    _refused(path, _meta_model(padding_idx=1), r"'layer.weight' \(padding_rows: saved \[5\], here \[1\]\)")


def test_an_old_opt_file_loads_with_the_check_on(monkeypatch, tmp_path):
    """The case that motivated it: OPT's positional embedding (the tiny OPT of ``test_hf_opt_positions.py``)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(0)
    original = transformers.OPTForCausalLM(config).eval()
    saved = _old_file(monkeypatch, original, tmp_path / "old.safetensors")
    with torch.device("meta"):
        model = transformers.OPTForCausalLM(config).eval()
    loaded = rpq_fx.load(model, tmp_path / "old.safetensors")
    assert _lookups(loaded) == 1
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, saved(ids).logits, rtol=0, atol=0)
        assert_outputs_close(loaded(ids).logits, dense_reference(original, loaded)(ids).logits)
