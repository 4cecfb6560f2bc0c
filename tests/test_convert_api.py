"""The public API: convert(), RPQ(), RPQConfig, decompress(), report(), model_size()."""

import copy
import gc
import json
import math
import subprocess
import sys
import weakref

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import codebook_gradient
import rpq_fx
from rpq_fx import RPQConfig, RPQConversionError
from rpq_fx.nn import RPQLinear, RPQWeight

MIB = 1024**2


def rpq_weights(gm: nn.Module) -> list[RPQWeight]:
    return [m for m in gm.modules() if isinstance(m, RPQWeight)]


def row(rep, layer):
    return next(r for r in rep.rows if r["layer"] == layer)


# ---------------------------------------------------------------------------------------------------
# converted vs the dense reference


def test_lenet_matches_dense_reference(zoo, check):
    net = zoo.LeNet()
    gm = rpq_fx.convert(net, num_codebooks=5)  # conv1 row 25, conv2 row 500, fc1 800, fc2 500: all divisible
    rep = rpq_fx.report(gm)
    assert [r["layer"] for r in rep.rows if not r["note"]] == ["fc1.weight"]
    check.matches_dense_reference(net, gm, torch.randn(4, 1, 28, 28))


def test_lenet_small_codebooks_convert_every_layer(zoo, check):
    net = zoo.LeNet()
    gm = rpq_fx.convert(net, num_codebooks=5, num_codes=4)
    assert rpq_fx.report(gm).totals["converted"] == 4
    assert check.converted_names(gm) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    check.matches_dense_reference(net, gm, torch.randn(4, 1, 28, 28))


def test_shared_module_is_one_rpq_weight(zoo, check):
    model = zoo.SharedModule()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert len(rpq_weights(gm)) == 1
    assert sum(1 for n in gm.graph.nodes if n.target is torch.ops.rpq_fx.linear.default) == 2  # one fused call per use
    assert list(rpq_fx.decompress(gm)) == ["fc.weight"]
    check.matches_dense_reference(model, gm, torch.randn(5, 64))


def test_tied_weights_are_one_rpq_weight(zoo, check):
    model = zoo.TiedLM()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert gm.emb.weight is gm.lm_head.weight
    assert len(rpq_weights(gm)) == 1
    dense = rpq_fx.decompress(gm)
    assert set(dense) == {"emb.weight", "lm_head.weight"}
    assert torch.equal(dense["emb.weight"], dense["lm_head.weight"])
    rep = rpq_fx.report(gm)
    assert len(rep.rows) == 1 and "lm_head.weight" in rep.rows[0]["note"]
    check.matches_dense_reference(model, gm, torch.randint(0, 1000, (3, 11)))


def test_tied_weights_stay_tied_through_training(zoo, check):
    model = zoo.TiedLM()
    gm = rpq_fx.convert(model, codebook_dim=16).train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    tokens = torch.randint(0, 1000, (4, 16))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(gm(tokens).flatten(0, 1), tokens.flatten()).backward()
        opt.step()
    assert gm.emb.weight is gm.lm_head.weight
    codebooks = [p for p in gm.parameters() if p.dim() == 3]
    assert len(codebooks) == 1 and gm.emb.weight.codebooks is gm.lm_head.weight.codebooks
    dense = rpq_fx.decompress(gm)
    assert torch.equal(dense["emb.weight"], dense["lm_head.weight"])
    check.matches_dense_reference(model, gm, tokens, leftovers=True)


def test_functional_calls_match_dense_reference(zoo, check):
    model = zoo.Functional()
    gm = rpq_fx.convert(model, codebook_dim=4)  # w: row 64, k: row 36, table: row 64
    assert check.converted_names(gm) == {"w", "k", "table"}
    check.matches_dense_reference(model, gm, *zoo.functional_inputs())


def test_functional_weight_also_read_elsewhere():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 64)
            self.fc = nn.Linear(64, 512)

        def forward(self, tokens):
            h = self.fc(self.emb(tokens))[..., :64]
            logits = F.linear(h, self.emb.weight)  # the embedding table read functionally as well
            return logits, self.fc.weight.pow(2).sum()  # and a weight read by a non-layer op

    model = Mixed()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert {"emb.weight", "fc.weight"} <= set(rpq_fx.decompress(gm))
    ref = copy.deepcopy(model)
    ref.load_state_dict(rpq_fx.decompress(gm), strict=False)
    tokens = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        for a, b in zip(gm(tokens), ref(tokens)):
            torch.testing.assert_close(a, b)


def test_functional_keyword_weights_and_unused_alias(check):
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(512, 64) / 8)
            self.k = nn.Parameter(torch.randn(512, 8, 4) / 6)
            self.emb = nn.Embedding(1000, 64)
            self.unused = nn.Linear(64, 1000, bias=False)  # never called, but its weight is emb's
            self.unused.weight = self.emb.weight

        def forward(self, x, seq, tokens):
            return F.linear(input=x, weight=self.w), F.conv1d(seq, weight=self.k, padding=1), self.emb(tokens)

    model = Keywords()
    gm = rpq_fx.convert(model, codebook_dim=16)
    dense = rpq_fx.decompress(gm)
    assert set(dense) == {"w", "k", "emb.weight", "unused.weight"}  # every name of the tied weight
    assert dense["unused.weight"] is dense["emb.weight"]
    check.matches_dense_reference(model, gm, torch.randn(2, 64), torch.randn(2, 8, 10), torch.randint(0, 1000, (2, 3)))


def test_conv_variants_match_dense_reference(zoo, check):
    model = zoo.ConvVariants()
    gm = rpq_fx.convert(model, codebook_dim=4, num_codes=64)
    assert check.converted_names(gm) == {f"{n}.weight" for n in
                                         ("reflect", "grouped", "same", "circular1d", "conv3d")}
    assert "mode = 'reflect'" in gm.code and "mode = 'circular'" in gm.code
    check.matches_dense_reference(model, gm, *zoo.conv_inputs())


@pytest.mark.parametrize("settings", [
    dict(codebook_dim=8, shared_codebooks=True),
    dict(codebook_dim=4, num_codes=300),  # int16 codes
    dict(num_codebooks=2, num_codes=2),
])
def test_settings_match_dense_reference(settings, zoo, check):
    model = zoo.Functional()
    gm = rpq_fx.convert(model, **settings)
    for name in check.converted_names(gm):
        weight = gm.get_submodule(name)
        groups = 1 if settings.get("shared_codebooks") else weight.num_codebooks
        assert weight.codebooks.shape == (groups, settings.get("num_codes", 256), weight.codebook_dim)
        assert weight.codes.dtype == (torch.int16 if settings.get("num_codes", 256) > 256 else torch.uint8)
    assert "w" in check.converted_names(gm)
    check.matches_dense_reference(model, gm, *zoo.functional_inputs())


def test_embedding_padding_idx_and_bias_free_linear(check):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(1000, 64, padding_idx=3, scale_grad_by_freq=True)
            self.fc = nn.Linear(64, 512, bias=False)

        def forward(self, t):
            return self.fc(self.emb(t))

    model = M()
    gm = rpq_fx.convert(model, codebook_dim=8)
    tokens = torch.tensor([[3, 1, 3, 999]])
    check.matches_dense_reference(model, gm, tokens)
    gm(tokens).sum().backward()
    reference = check.dense_reference(model, gm)
    reference.emb.weight.requires_grad_()
    reference(tokens).sum().backward()
    # the codebook gradient is the dense gradient summed per codeword (the padding row contributes none)
    weight = gm.emb.weight
    expected = codebook_gradient(reference.emb.weight.grad, weight.codes, weight.codebooks.shape[0], weight.num_codes)
    torch.testing.assert_close(gm.emb.weight.codebooks.grad, expected)


def test_rpq_one_liner_on_readme_lenet(zoo, check):
    net = zoo.LeNet()
    before = rpq_fx.model_size(net)
    gm = rpq_fx.RPQ(net)
    assert isinstance(gm, fx.GraphModule)
    out = gm(torch.randn(1, 1, 28, 28))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    rep = rpq_fx.report(gm)
    assert rep.totals["converted"] >= 1
    assert all(r["ratio"] >= 1 for r in rep.rows), "the defaults grew a layer"
    assert all(r["bytes after"] <= r["bytes before"] for r in rep.rows)
    assert rpq_fx.model_size(gm) < before
    fc1 = row(rep, "fc1.weight")
    assert fc1["d"] <= 64 and fc1["C"] * fc1["d"] == 800 and fc1["K"] == 256
    check.matches_dense_reference(net, gm, torch.randn(3, 1, 28, 28))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)),  # everything tiny
    lambda: nn.Sequential(nn.Embedding(300, 7), nn.Linear(7, 300)),  # prime rows, barely over 256 rows
    lambda: nn.Sequential(nn.Conv2d(3, 300, 1), nn.Conv2d(300, 257, 3)),
])
def test_rpq_defaults_never_grow(make):
    model = make()
    gm = rpq_fx.RPQ(model)
    rep = rpq_fx.report(gm)
    assert all(r["bytes after"] <= r["bytes before"] for r in rep.rows)
    assert rpq_fx.model_size(gm) <= rpq_fx.model_size(model)


# ---------------------------------------------------------------------------------------------------
# the input model


def test_input_model_untouched(zoo, check):
    model = zoo.TiedLM()
    model.eval()
    tokens = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        out_before = model(tokens)
    before = check.snapshot(model)
    gm = rpq_fx.convert(model, codebook_dim=16, inplace=False)
    check.unchanged(model, before)
    assert model.emb.weight is model.lm_head.weight
    # train the converted model: nothing may flow back into the input model
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=1.0)
    gm(tokens).square().mean().backward()
    opt.step()
    check.unchanged(model, before)
    assert gm.norm.weight is not model.norm.weight
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), out_before, rtol=0, atol=0)


def test_input_model_untouched_with_every_option(zoo, check):
    model = zoo.ConvVariants()
    before = check.snapshot(model)
    rpq_fx.convert(model, codebook_dim=4, checkpoint=True, shared_codebooks=True, num_codes=16, seed=3)
    rpq_fx.RPQ(model)
    check.unchanged(model, before)


def test_inplace_frees_converted_dense_weights(zoo, check):
    model = zoo.LeNet()
    original = copy.deepcopy(model)
    dead = weakref.ref(model.fc1.weight)
    kept = weakref.ref(model.fc2.weight)
    gm = rpq_fx.convert(model, num_codebooks=16, inplace=True)
    assert rpq_fx.report(gm).totals["converted"] == 1  # fc1 only
    gc.collect()
    assert dead() is None, "the dense weight of a converted layer is still alive"
    assert kept() is not None and kept() is gm.fc2.weight  # inplace: unconverted layers are moved, not copied
    assert "fc1.weight" not in dict(model.named_parameters())
    check.matches_dense_reference(original, gm, torch.randn(2, 1, 28, 28))


def test_inplace_frees_tied_and_functional_weights(zoo, check):
    model = zoo.TiedLM()
    original = copy.deepcopy(model)
    dead = weakref.ref(model.emb.weight)
    gm = rpq_fx.convert(model, codebook_dim=16, inplace=True)
    gc.collect()
    assert dead() is None
    check.matches_dense_reference(original, gm, torch.randint(0, 1000, (2, 5)))

    model = zoo.Functional()
    original = copy.deepcopy(model)
    dead = [weakref.ref(model.w), weakref.ref(model.table)]
    gm = rpq_fx.convert(model, codebook_dim=16, inplace=True)
    gc.collect()
    assert all(ref() is None for ref in dead)
    check.matches_dense_reference(original, gm, *zoo.functional_inputs())


# ---------------------------------------------------------------------------------------------------
# meta device


class _NoAllocation(TorchDispatchMode):
    """Records every tensor op that produces a tensor holding data (not on meta, not empty)."""

    def __init__(self):
        super().__init__()
        self.allocations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() > 0:
                self.allocations.append((func, tuple(t.shape), t.device))
        return out


def test_meta_model_converts_without_allocating():
    with torch.device("meta"):
        # dense: 2 x 1 GiB of float32 -- allocating either on the CPU would be hard to miss
        model = nn.Sequential(nn.Embedding(65536, 4096), nn.LayerNorm(4096), nn.Linear(4096, 65536))
    with _NoAllocation() as mode:
        gm = rpq_fx.convert(model, codebook_dim=64)
    assert not mode.allocations, mode.allocations[:5]
    tensors = dict(gm.state_dict())
    assert tensors and all(t.device.type == "meta" for t in tensors.values())
    assert all(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()])
    assert {"0.weight.codebooks", "0.weight.codes", "2.weight.codebooks", "2.weight.codes"} <= tensors.keys()
    assert "0.weight" not in tensors and "2.weight" not in tensors
    assert tensors["2.weight.codebooks"].shape == (64, 256, 64)
    assert tensors["2.weight.codes"].shape == (64, 65536) and tensors["2.weight.codes"].dtype == torch.uint8
    assert rpq_fx.report(gm).totals["converted"] == 2
    out = gm(torch.zeros(2, 3, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 65536)


# ---------------------------------------------------------------------------------------------------
# random init


class InitModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4096, 256)
        self.fc = nn.Linear(256, 2048)
        self.conv = nn.Conv2d(32, 1024, 3)

    def forward(self, t, img):
        return self.fc(self.emb(t)), self.conv(img)


def test_random_init_matches_dense_default_init():
    model = InitModel()
    gm = rpq_fx.convert(model, codebook_dim=32, seed=7)
    dense = rpq_fx.decompress(gm)
    for name, fan_in in (("fc.weight", 256), ("conv.weight", 32 * 9)):
        w = dense[name]
        expected = 1 / (3 * fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert w.var().item() == pytest.approx(expected, rel=0.05), name
        assert w.abs().max().item() <= 1 / math.sqrt(fan_in) + 1e-7
        assert abs(w.mean().item()) < 0.05 / math.sqrt(fan_in)
        dense_var = getattr(model, name.split(".")[0]).weight.var().item()
        assert w.var().item() == pytest.approx(dense_var, rel=0.05)
    emb = dense["emb.weight"]
    assert emb.var().item() == pytest.approx(1.0, rel=0.05)
    assert abs(emb.mean().item()) < 0.05
    # codes are uniform over the K codewords
    counts = torch.bincount(gm.fc.weight.codes.flatten().long(), minlength=256).float()
    assert counts.min() > 0 and (counts.std() / counts.mean()).item() < 0.15


def test_seed_is_deterministic_and_matters():
    model = InitModel()
    a = rpq_fx.convert(model, codebook_dim=32, seed=1)
    b = rpq_fx.convert(model, codebook_dim=32, seed=1)
    c = rpq_fx.convert(model, codebook_dim=32, seed=2)
    torch.manual_seed(123)  # the global RNG does not matter, only the seed
    d = rpq_fx.convert(model, codebook_dim=32, seed=1)
    for name in ("emb", "fc", "conv"):
        wa, wb, wc, wd = (getattr(g, name).weight for g in (a, b, c, d))
        assert torch.equal(wa.codes, wb.codes) and torch.equal(wa.codebooks, wb.codebooks)
        assert torch.equal(wa.codes, wd.codes) and torch.equal(wa.codebooks, wd.codebooks)
        assert not torch.equal(wa.codes, wc.codes) and not torch.equal(wa.codebooks, wc.codebooks)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.fc = nn.Linear(16, 300)
        self.conv = nn.Conv2d(4, 300, 3)

    def forward(self, t, img):
        return self.fc(self.emb(t)), self.conv(img)


class DataDependent(nn.Module):
    """fx cannot trace it (a branch on input values): converted in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 16)
        self.fc = nn.Linear(16, 300)

    def forward(self, t):
        h = self.emb(t)
        return self.fc(h if h.sum() > 0 else -h)


SMALL = dict(codebook_dim=4, num_codes=16)


@pytest.mark.parametrize("how", ["fx", "in place", "export", "kmeans", "calibrated", "hot rows", "meta"])
def test_convert_and_load_leave_the_global_generator_alone(how, tmp_path):
    model = (DataDependent if how == "in place" else Small)()
    t, img = torch.randint(0, 300, (2, 8)), torch.randn(1, 4, 5, 5)
    options = {"export": {"example_inputs": (t, img)}, "kmeans": {"init": "kmeans"},
               "calibrated": {"init": "kmeans", "calibration": [(t, img)]},
               "hot rows": {"config": RPQConfig(**SMALL, hot_rows=4, hot_codebook_dim=4)}}.get(how, {})
    if how == "meta":
        model = model.to("meta")
    state = torch.random.get_rng_state()
    gm = rpq_fx.convert(model, **({} if "config" in options else SMALL), **options, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state), "convert drew from torch's global generator"
    if how in ("fx", "in place", "hot rows"):
        path, skeleton = rpq_fx.save(gm, tmp_path / "m.safetensors"), type(model)()
        state = torch.random.get_rng_state()
        rpq_fx.load(skeleton, path)
        assert torch.equal(torch.random.get_rng_state(), state), "load drew from torch's global generator"


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_frozen_dense_weights_give_frozen_codebooks(init):
    for model in (Small(), DataDependent()):
        model.fc.weight.requires_grad_(False)
        gm = rpq_fx.convert(model, config=RPQConfig(**SMALL, init=init, hot_rows=2, hot_codebook_dim=4),
                            progress=False)
        assert [p.requires_grad for p in gm.fc.weight.parameters()] == [False, False], type(model).__name__
        assert all(p.requires_grad for p in gm.emb.weight.parameters())
        assert model.fc.weight.requires_grad is False and model.emb.weight.requires_grad is True


def test_convert_does_not_import_timm():
    # reason: importing timm costs ~190 MiB of resident memory; a model without timm layers does not need it
    code = ("import sys, torch, rpq_fx; rpq_fx.convert(torch.nn.Sequential(torch.nn.Linear(512, 512)), "
            "num_codebooks=8); print('timm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# training


def test_training_reduces_loss_and_moves_only_codebooks_and_leftovers(check):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.LayerNorm(512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 4))
    gm = rpq_fx.convert(model, codebook_dim=16).train()
    converted = check.converted_names(gm)
    assert converted == {"0.weight", "3.weight"}  # "5.weight" (4 rows) stays dense
    x = torch.randn(256, 64)
    y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2:4].sum(1) > 0).long()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    params = dict(gm.named_parameters())
    assert not any(k.endswith("codes") for k in params), "codes must not be trainable"
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(gm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    after = gm.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key.endswith(".codes"):
            assert torch.equal(after[key], value), f"{key} changed: codes never train"
            assert after[key].dtype == torch.uint8
        else:
            assert not torch.equal(after[key], value), f"{key} did not train"
    assert {k for k in after if k.endswith("codebooks")} == {f"{n}.codebooks" for n in converted}
    # still exactly what its (new) RPQ weights say
    check.matches_dense_reference(model, gm, x[:8], leftovers=True)


# ---------------------------------------------------------------------------------------------------
# config


def test_config_round_trips_through_dict_and_json():
    config = RPQConfig(codebook_dim=16, num_codes=512, shared_codebooks=True, checkpoint=True, seed=5,
                       overrides={"blocks.*.fc1": {"num_codebooks": 8}, "head*": {"skip": True},
                                  "emb": {"num_codes": 16, "shared_codebooks": False}})
    plain = config.to_dict()
    assert isinstance(plain, dict) and plain["codebook_dim"] == 16
    assert RPQConfig.from_dict(plain) == config
    assert RPQConfig.from_dict(json.loads(json.dumps(plain))) == config
    assert RPQConfig.from_dict(RPQConfig(num_codebooks=4).to_dict()) == RPQConfig(num_codebooks=4)


def test_config_unknown_keys_rejected():
    with pytest.raises(ValueError, match="frobnicate"):
        RPQConfig.from_dict({"num_codebooks": 4, "frobnicate": 1})
    with pytest.raises(ValueError, match="num_codebook"):
        RPQConfig(num_codebooks=4, overrides={"fc1": {"num_codebook": 2}})
    with pytest.raises(ValueError, match="fc1"):
        RPQConfig(num_codebooks=4, overrides={"fc1": {"num_codebooks": 0}})


def test_config_overrides_by_pattern(zoo, check):
    net = zoo.LeNet()
    config = RPQConfig(num_codebooks=5, num_codes=4,
                       overrides={"fc*": {"num_codebooks": 10}, "conv2": {"skip": True}, "fc2.weight": {"num_codebooks": 20}})
    gm = rpq_fx.convert(net, config=config)
    rep = rpq_fx.report(gm)
    assert (row(rep, "conv1.weight")["C"], row(rep, "conv1.weight")["d"]) == (5, 5)
    assert (row(rep, "fc1.weight")["C"], row(rep, "fc1.weight")["d"]) == (10, 80)
    assert row(rep, "fc2.weight")["C"] == 20  # the later, more specific pattern wins
    assert "override" in row(rep, "conv2.weight")["note"] and row(rep, "conv2.weight")["C"] is None
    assert gm.fc1.weight.codebooks.shape == (10, 4, 80)
    assert isinstance(gm.conv2, nn.Conv2d)
    check.matches_dense_reference(net, gm, torch.randn(2, 1, 28, 28))


def test_config_and_arguments_do_not_mix(zoo):
    with pytest.raises(ValueError, match="num_codebooks=4"):
        rpq_fx.convert(zoo.LeNet(), 4, config=RPQConfig(num_codebooks=5))
    with pytest.raises(TypeError, match="dict"):
        rpq_fx.convert(zoo.LeNet(), config={"num_codebooks": 5})


# ---------------------------------------------------------------------------------------------------
# report and model_size


def test_model_size_matches_manual_byte_count(zoo):
    net = zoo.LeNet()
    dense = (20 * 25 + 20 + 50 * 500 + 50 + 500 * 800 + 500 + 10 * 500 + 10) * 4
    assert rpq_fx.model_size(net) == dense / MIB
    gm = rpq_fx.convert(net, num_codebooks=16)  # fc1 only: 16 codebooks of 256 x 50, codes [16, 500] uint8
    after = dense - 500 * 800 * 4 + 16 * 256 * 50 * 4 + 16 * 500
    assert rpq_fx.model_size(gm) == after / MIB
    tied = zoo.TiedLM()  # a tied parameter counts once
    assert rpq_fx.model_size(tied) == (1000 * 64 + 64 + 64) * 4 / MIB
    buffers = nn.BatchNorm1d(10)  # buffers count: 2 x 10 params, 2 x 10 float + 1 int64 buffers
    assert rpq_fx.model_size(buffers) == (40 * 4 + 8) / MIB


def test_report_rows_and_totals_consistent(zoo):
    net = zoo.LeNet()
    gm = rpq_fx.convert(net, num_codebooks=5, num_codes=16, filter_fn=lambda m, name: name != "conv1")
    rep = rpq_fx.report(gm)
    assert [r["layer"] for r in rep.rows] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    conv1 = row(rep, "conv1.weight")
    assert "filter_fn" in conv1["note"] and conv1["bytes after"] == conv1["bytes before"] == 20 * 25 * 4
    fc1 = row(rep, "fc1.weight")
    assert (fc1["op"], fc1["shape"], fc1["C"], fc1["K"], fc1["d"]) == ("linear", "500x800", 5, 16, 160)
    assert fc1["bytes before"] == 500 * 800 * 4
    assert fc1["bytes after"] == 5 * 16 * 160 * 4 + 5 * 500
    assert fc1["ratio"] == pytest.approx(fc1["bytes before"] / fc1["bytes after"])
    assert row(rep, "conv2.weight")["shape"] == "50x20x5x5"
    t = rep.totals
    assert "would grow" in row(rep, "fc2.weight")["note"]  # 10 rows: 16 codewords of 100 cost more
    assert (t["layers"], t["converted"]) == (4, 2)
    assert t["bytes_after"] == rpq_fx.model_size(gm) * MIB
    assert t["bytes_before"] == rpq_fx.model_size(net) * MIB
    assert t["bytes_before"] - t["bytes_after"] == sum(r["bytes before"] - r["bytes after"] for r in rep.rows)
    assert t["ratio"] == pytest.approx(t["bytes_before"] / t["bytes_after"])
    text = str(rep)
    for name in ("conv1.weight", "fc1.weight", "filter_fn", "2 of 4"):
        assert name in text
    assert "| fc1.weight" in rep.to_markdown()
    assert json.loads(json.dumps(rep.to_dict())) == rep.to_dict()


def test_report_of_eager_rpq_layers():
    model = nn.Sequential(RPQLinear(64, 512, num_codebooks=4), nn.ReLU(), nn.Linear(512, 8))
    rep = rpq_fx.report(model)
    assert len(rep.rows) == 1
    r = rep.rows[0]
    assert (r["layer"], r["C"], r["K"], r["d"]) == ("0.weight", 4, 256, 16)
    assert r["bytes after"] == 4 * 256 * 16 * 4 + 4 * 512
    assert rep.totals["bytes_after"] == rpq_fx.model_size(model) * MIB


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_codebooks=0), ["num_codebooks", "0"]),
    (dict(num_codebooks=-1), ["num_codebooks", "-1"]),
    (dict(num_codebooks=2.5), ["num_codebooks", "2.5"]),
    (dict(num_codebooks=True), ["num_codebooks", "True"]),
    (dict(num_codebooks="4"), ["num_codebooks", "'4'"]),
    (dict(codebook_dim=0), ["codebook_dim", "0"]),
    (dict(num_codebooks=4, codebook_dim=8), ["num_codebooks=4", "codebook_dim=8", "exactly one"]),
    (dict(), ["exactly one", "none"]),
    (dict(num_codebooks=4, num_codes=1), ["num_codes", "1"]),
    (dict(num_codebooks=4, num_codes=65537), ["num_codes", "65537", "65536"]),
    (dict(num_codebooks=4, num_codes=0), ["num_codes", "0"]),
    (dict(num_codebooks=4, seed=-1), ["seed", "-1"]),
    (dict(num_codebooks=4, shared_codebooks="yes"), ["shared_codebooks", "'yes'"]),
])
def test_bad_settings_raise_naming_the_value(kwargs, words, zoo, check):
    model = zoo.LeNet()
    before = check.snapshot(model)
    with pytest.raises(ValueError) as info:
        rpq_fx.convert(model, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    check.unchanged(model, before)


@pytest.mark.parametrize("value", [None, "model", torch.zeros(3), [nn.Linear(2, 2)]])
def test_non_module_is_a_type_error(value):
    with pytest.raises(TypeError) as info:
        rpq_fx.convert(value, num_codebooks=4)
    assert type(value).__name__ in str(info.value)
    assert "Module" in str(info.value)


class Branchy(nn.Module):
    """Data-dependent control flow at the root: fx cannot trace it, its layers are fine."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 512)
        self.gate = BranchyGate()

    def forward(self, x):
        return self.gate(self.fc(x) if x.mean() > 0 else self.fc(-x))


class BranchyGate(nn.Module):
    """Owns a weight and branches on data itself: run untraced, through functional_call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 512) / 23)

    def forward(self, h):
        return h @ self.w if h.sum() > 0 else h @ self.w.t()


def test_untraceable_root_falls_back_to_rewriting_its_layers_in_place(check):
    model = Branchy()
    before = check.snapshot(model)
    converted = rpq_fx.convert(model, codebook_dim=16)
    check.unchanged(model, before)
    assert type(converted) is Branchy and converted is not model
    assert converted.rpq_path.startswith("in place")
    assert type(converted.fc) is RPQLinear and converted.fc.in_features == 64  # a real layer, not a bare graph
    gate = next(layer for layer in converted.rpq_layers if layer.name == "gate.w")
    assert gate.converted and gate.ops == ("BranchyGate",)
    assert isinstance(converted.gate.w, rpq_fx.nn.RPQWeight)
    reference = check.dense_reference(model, converted)
    for sign in (1, -1):  # both branches of the untraceable root
        x = sign * (torch.randn(4, 64).abs() + 0.1)
        with torch.no_grad():
            check.outputs_close(converted(x), reference(x))



def test_strict_error_names_the_layer_and_leaves_model_untouched(zoo, check):
    net = zoo.LeNet()
    before = check.snapshot(net)
    with pytest.raises(RPQConversionError) as info:
        rpq_fx.convert(net, num_codebooks=10, strict=True)
    message = str(info.value)
    assert "conv1.weight" in message and "not divisible" in message and "25" in message
    assert "fc2.weight" in message and "would grow" in message
    assert "fc1.weight" not in message
    check.unchanged(net, before)


@pytest.mark.parametrize("how", ["graph", "eager"])
def test_converting_a_converted_model_is_an_error(how, zoo, check):
    if how == "graph":
        model = rpq_fx.convert(zoo.LeNet(), num_codebooks=5)
        where = "fc1.weight"
    else:
        model = nn.Sequential(nn.Linear(64, 64), RPQLinear(64, 512, num_codebooks=4))
        where = "1.weight"
    before = check.snapshot(model)
    with pytest.raises(RPQConversionError) as info:
        rpq_fx.convert(model, num_codebooks=5)
    assert "already" in str(info.value) and where in str(info.value)
    with pytest.raises(RPQConversionError):
        rpq_fx.RPQ(model)
    check.unchanged(model, before)


@pytest.mark.parametrize("excluded_layer", ["emb", "lm_head"])
def test_filter_fn_excluding_any_layer_of_a_tied_weight_keeps_it_dense(zoo, excluded_layer):
    gm = rpq_fx.convert(zoo.TiedLM(), num_codebooks=4, filter_fn=lambda layer, name: name != excluded_layer)
    tied = next(layer for layer in gm.rpq_layers if "lm_head.weight" in layer.aliases)
    assert not tied.converted and tied.reason == "excluded by filter_fn"
    assert not rpq_fx.decompress(gm)


def test_report_says_which_kernels_compute(monkeypatch):
    """The report names the compute path: the C++ kernels, or stock ops with the reason (issue 20 item 4)."""
    from rpq_fx import _kernels

    gm = rpq_fx.convert(nn.Sequential(nn.Linear(64, 512)), num_codebooks=8)
    monkeypatch.setattr(_kernels, "status", lambda: "stock torch ops (C++ kernels not available: no C++ compiler)")
    rep = rpq_fx.report(gm)
    assert rep.totals["kernels"] == "stock torch ops (C++ kernels not available: no C++ compiler)"
    assert str(rep).splitlines()[-1] == "compute: stock torch ops (C++ kernels not available: no C++ compiler)"
