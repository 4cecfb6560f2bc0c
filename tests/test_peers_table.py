"""benchmarks/peers.py's accounting: stored bits from the tensors a model really keeps, the
weights a peer covered, and the budget check behind its targets."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _peers.output import above, budget_check  # noqa: E402
from _peers.storage import covered, model_bytes, stored_bits_per_weight  # noqa: E402


class PackedLinear(nn.Module):
    """A stand-in for a quantized layer: int4 codes packed two to a byte, an fp32 scale per group of 32."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // 32))
        self.bias = nn.Parameter(torch.zeros(out_features))


class MetaLinear(nn.Module):
    """Like HQQ's HQQLinear: packed codes as a parameter, scales and zeros in a plain ``meta`` dict."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.W_q = nn.Parameter(torch.zeros(out_features * in_features // 4, dtype=torch.uint8), requires_grad=False)
        self.meta = {"nbits": 2, "scale": torch.ones(out_features * in_features // 64, 1),
                     "zero": torch.zeros(out_features * in_features // 64, 1)}


def _dense():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


def test_model_bytes_counts_each_storage_once():
    model = _dense()
    assert model_bytes(model) == 4 * (64 * 32 + 32 + 32 * 8 + 8)
    model[2].weight = model[0].weight  # tied: one storage
    assert model_bytes(model) == 4 * (64 * 32 + 32 + 8)


def test_stored_bits_packed_codes_and_group_scales():
    dense = _dense()
    weights = {"0.weight": dense[0].weight}
    quantized = _dense()
    quantized[0] = PackedLinear(32, 64)
    assert stored_bits_per_weight(dense, quantized, weights) == pytest.approx(4 + 32 / 32)
    assert covered(quantized, weights) == ["0.weight"]


def test_stored_bits_counts_meta_dict_and_dense_leftovers():
    dense = _dense()
    weights = {"0.weight": dense[0].weight, "2.weight": dense[2].weight}
    quantized = _dense()
    quantized[0] = MetaLinear(32, 64)  # no bias kept: the model shrinks by it, and that counts too
    bits = 8 * (32 * 64 // 4 + 2 * 4 * (32 * 64 // 64) - 4 * 32) + 32 * 32 * 8
    assert stored_bits_per_weight(dense, quantized, weights) == pytest.approx(bits / (32 * 64 + 32 * 8))
    assert covered(quantized, weights) == ["0.weight"]  # the second layer stayed dense


def test_stored_bits_of_a_tensor_subclass_reads_its_inner_tensors():
    torchao = pytest.importorskip("torchao.quantization")
    dense = nn.Sequential(nn.Linear(256, 64))
    quantized = nn.Sequential(nn.Linear(256, 64))
    quantized.load_state_dict(dense.state_dict())
    from torchao.quantization.granularity import PerGroup

    torchao.quantize_(quantized, torchao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    # int4 kept unpacked in int8, an fp32 scale and an int8 zero point per group of 32
    assert stored_bits_per_weight(dense, quantized, {"0.weight": dense[0].weight}) == pytest.approx(8 + 40 / 32)


def _row(library, bits, q):
    return {"library": library, "bits_per_weight": bits, "q": q, "setting": f"{bits}", "error": None}


def test_budget_check_finds_where_a_peer_wins():
    rows = [_row("dense", 32, 1.0), _row("rpq_fx", 2.1, 0.88), _row("rpq_fx", 4.1, 0.98), _row("hqq", 2.5, 0.2),
            _row("torchao", 4.5, 0.99), _row("quanto", 1.5, 0.1), dict(_row("hqq", 1.0, 0.99), error="boom")]
    checks = {round(c["budget"], 1): c for c in budget_check(rows, "q")}
    assert sorted(checks) == [1.5, 2.1, 2.5]  # errors and rows over 4 bits set no budget
    assert not checks[1.5]["holds"] and checks[1.5]["rpq"] is None  # only a peer fits under 1.5 bits
    assert checks[2.1]["holds"] and checks[2.5]["holds"]
    rows.append(_row("torchao", 2.0, 0.9))
    assert not {round(c["budget"], 1): c for c in budget_check(rows, "q")}[2.1]["holds"]
    assert [r["library"] for r in above(rows, "q", 0.85, 2.2)] == ["rpq_fx", "torchao"]
