"""benchmarks/peers.py's accounting: stored bits from the tensors a model really keeps, the
weights a peer covered, and the budget check behind its targets."""

import dataclasses
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


# --- rpq_fx's rows: stored configs, rebuilt at random for a retiming ---------------------------------

def _tiny_task(name: str = "digits"):
    from _quality.tasks import Task

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    x = torch.randn(96, 32)
    reference = model(x).detach()

    def evaluate(m):
        with torch.no_grad():
            return {"accuracy": float(torch.nn.functional.cosine_similarity(m(x), reference).mean()),
                    "agreement": 1.0}

    task = Task(name, "tiny", model, evaluate, {"accuracy": "cosine", "agreement": "agreement"},
                list(x.split(32)), "a tiny task")
    task.weights = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    return task


def test_rebuild_at_random_stores_what_the_fit_stores():
    from _peers import rpq
    from _quality.methods import weight_filter

    task = _tiny_task()
    chosen = weight_filter(task.weights)
    plans = rpq.rows("digits", (4,), allocate=False)
    assert [p.short for p in plans] == ["d=4", "d=4 fp16", "d=8 M=3", "allocate", "d=4 tuned"]  # extras after dims
    assert plans[2].config["additive_codebooks"] == 3 and plans[2].config["codebook_dtype"] == "float16"
    # reason: the additive fit at K=256 takes 20 CPU-s on this tiny model; K=16 keeps its format's parts
    for plan in (plans[0], dataclasses.replace(plans[2], config={**plans[2].config, "num_codes": 16}),
                 dataclasses.replace(plans[4], finetune_steps=4)):
        fitted, extra = rpq.fit(plan, task, chosen)
        config = extra["config"]
        assert extra.get("finetune_steps") == (plan.finetune_steps or None)
        assert config["init"] == "kmeans" and config["codebook_dim"] == plan.config["codebook_dim"]
        rebuilt = rpq.rebuild(config, task, chosen)
        assert stored_bits_per_weight(task.model, rebuilt, task.weights) == \
            stored_bits_per_weight(task.model, fitted, task.weights)
        assert [type(m).__name__ for m in rebuilt.modules()] == [type(m).__name__ for m in fitted.modules()]
        assert rebuilt.code == fitted.code  # the same graph: the same forward paths
        # drawn at random, not fitted: far from the dense output where the fit is close to it
        assert task.evaluate(rebuilt)["accuracy"] < 0.5 < task.evaluate(fitted)["accuracy"]
    overrides = {**plans[0].config, "overrides": {"2.weight": {"codebook_dim": 8, "init": "kmeans"}}}
    mixed = rpq.rebuild(overrides, task, chosen)
    assert {r["layer"]: r["init"] for r in __import__("rpq_fx").report(mixed).rows if r["init"]} == \
        {"0.weight": "random", "2.weight": "random"}
    with pytest.raises(ValueError, match="config must be a dict"):
        rpq.rebuild(None, task, chosen)


def test_latency_only_retimes_rows_and_keeps_every_other_number(monkeypatch):
    import peers
    from _peers import rpq
    from _quality.methods import weight_filter

    task = _tiny_task()
    monkeypatch.setitem(peers.BUILDERS, "digits", lambda **_: task)
    chosen = weight_filter(task.weights)
    model, extra = rpq.fit(rpq.rows("digits", (4,), False)[0], task, chosen)
    config = extra["config"]
    bits = stored_bits_per_weight(task.model, model, task.weights)

    def row(library, setting, **extra):
        return {"library": library, "method": "m", "setting": setting, "version": "v", "error": None,
                "bits_per_weight": 32.0, "accuracy": 0.5, "covered": "2 of 2", "model_mib": 0.1,
                "lat1": 9.0, "lat32": 9.0, **extra}

    rows = [row("dense", "fp32"), row("rpq_fx", "d=4", config=config, bits_per_weight=bits),
            row("rpq_fx", "wrong bits", config=config, bits_per_weight=bits + 0.5),
            row("rpq_fx", "old run", bits_per_weight=bits),
            row("RTN (here)", "int2", lat1=None, lat32=None), row("hqq", "2 bits", error="boom")]
    entry = {"name": "digits", "rows": rows}
    peers.refresh_latency(entry, quick=True)
    dense, good, wrong, old, rtn, failed = rows
    assert dense["lat1"] == dense["lat32"] == 1.0 and dense["lat1_ms"] > 0
    assert 0 < good["lat1"] != 9.0 and good["lat32_ms"] > 0 and good["lat_load"] >= 0
    assert all(r["accuracy"] == 0.5 for r in rows)  # quality is never re-measured
    assert wrong["lat1"] is None and "stores" in wrong["lat_error"]
    assert old["lat1"] is None and "no rpq_fx config" in old["lat_error"]
    assert rtn["lat1"] is None and "lat_error" not in rtn and failed["lat1"] == 9.0  # neither is timed
    assert entry["latency"]["threads"] == torch.get_num_threads()
    assert entry["latency"]["lat_load_min"] <= entry["latency"]["lat_load_max"]
    from _peers.output import task_table, timing_text
    from tabulate import tabulate

    text = task_table({**entry, "title": "t", "notes": "", "metrics": {"accuracy": "cosine"}},
                      lambda r, h, **o: tabulate(r, h, **o))
    assert "could not be measured again: ValueError: the rebuilt model stores" in text
    assert timing_text(entry["latency"]) in text and "threads, load average" in text


def test_rows_of_a_partial_run_replace_their_namesakes_only():
    import peers

    def row(library, setting, q):
        return {"library": library, "method": "m", "setting": setting, "q": q}

    earlier = {"name": "t", "notes": "kept", "rows": [row("dense", "fp32", 1), row("torchao", "a", 0.1),
                                                      row("hqq", "b", 0.2)]}
    new = {"name": "t", "rows": [row("dense", "fp32", 2), row("torchao", "a", 0.3), row("torchao", "c", 0.4)]}
    merged = peers.merge_rows(earlier, new)
    assert [(r["library"], r["setting"], r["q"]) for r in merged["rows"]] == [
        ("dense", "fp32", 1), ("torchao", "a", 0.3), ("hqq", "b", 0.2), ("torchao", "c", 0.4)]
    assert merged["notes"] == "kept" and earlier["rows"][1]["q"] == 0.1  # the earlier task is not modified
    head = {"library": "torchao", "method": "codebook_weight_only (prototype)", "setting": "uint4 codes"}
    assert peers._chosen(head, ()) and peers._chosen(head, ["codebook_weight", "hqq"])
    assert not peers._chosen(head, ["HQQLinear"])
