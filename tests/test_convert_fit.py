"""convert(init="kmeans", calibration=..., codebook_dtype=...): fitted weights, against dense references."""

import copy

import pytest
import torch
from torch import nn

import rpq_fx
from conftest import assert_outputs_close, dense_reference


class Classifier(nn.Module):
    """A small CNN with a BatchNorm, a padded embedding path and a layer too small to convert."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 320, 3, padding=1)
        self.norm = nn.BatchNorm2d(320)
        self.fc1 = nn.Linear(320, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(self.conv(x)).mean((2, 3)))))


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights with structure (low-rank plus noise), as trained weights have, instead of i.i.d. init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                rows = p.shape[0]
                basis = torch.randn(8, p[0].numel(), generator=g)
                p.copy_((torch.randn(rows, 8, generator=g) @ basis + 0.1 * torch.randn(rows, basis.shape[1], generator=g))
                        .view_as(p) * p.std() / 3)
    return model


def inputs(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(42)) + 2 * torch.eye(4)
    return (torch.randn(n, 8, 8, 4, generator=g) @ mix).permute(0, 3, 1, 2).contiguous()


def relative_error(model, original, x):
    with torch.no_grad():
        out, ref = model(x), original(x)
    return float((out - ref).square().sum() / ref.square().sum())


@pytest.fixture(scope="module")
def classifier():
    return trained_like(Classifier()).eval()


def test_kmeans_fits_the_trained_weights_and_computes_what_its_weights_say(classifier):
    random = rpq_fx.convert(classifier, codebook_dim=4, shared_codebooks=True, progress=False)
    fitted = rpq_fx.convert(classifier, codebook_dim=4, shared_codebooks=True, init="kmeans", progress=False)
    x = inputs(1)
    assert_outputs_close(fitted(x), dense_reference(classifier, fitted)(x))
    assert relative_error(fitted, classifier, x) < 0.1 * relative_error(random, classifier, x)
    fits = rpq_fx.conversion_record(fitted).fits
    assert fits["fc1.weight"].filled == "kmeans" and 0 < fits["fc1.weight"].error < 0.2
    assert {fit.filled for fit in fits.values()} == {"kmeans"}
    assert {layer.settings.init for layer in fitted.rpq_layers if layer.converted} == {"kmeans"}


def test_calibration_lowers_the_held_out_output_error(classifier):
    calibration = [inputs(seed) for seed in range(10, 14)]
    plain = rpq_fx.convert(classifier, codebook_dim=8, shared_codebooks=True, init="kmeans", progress=False)
    aware = rpq_fx.convert(classifier, codebook_dim=8, shared_codebooks=True, init="kmeans",
                           calibration=calibration, progress=False)
    held_out = inputs(99, 64)
    assert_outputs_close(aware(held_out), dense_reference(classifier, aware)(held_out))
    assert relative_error(aware, classifier, held_out) < 0.7 * relative_error(plain, classifier, held_out)
    assert {fit.filled for fit in rpq_fx.conversion_record(aware).fits.values()} == {"kmeans+calibration"}


def test_the_input_model_is_untouched_by_a_calibrated_conversion():
    net = trained_like(Classifier()).train()
    before = copy.deepcopy(net.state_dict())
    rpq_fx.convert(net, codebook_dim=8, shared_codebooks=True, init="kmeans", calibration=[inputs(0, 4)],
                   progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too


def test_fits_are_deterministic_for_a_seed(classifier):
    a, b, c = (rpq_fx.convert(classifier, codebook_dim=4, init="kmeans", seed=s, progress=False,
                              filter_fn=lambda m, n: n == "fc1") for s in (3, 3, 4))
    assert torch.equal(a.fc1.weight.codebooks, b.fc1.weight.codebooks) and torch.equal(a.fc1.weight.codes, b.fc1.weight.codes)
    assert not torch.equal(a.fc1.weight.codebooks, c.fc1.weight.codebooks)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_codebooks_are_stored_counted_and_expanded_in_the_layer_dtype(classifier, dtype):
    rpq = rpq_fx.convert(classifier, codebook_dim=4, init="kmeans", codebook_dtype=dtype, progress=False)
    x = inputs(2)
    assert rpq.fc1.weight.codebooks.dtype == dtype and rpq.fc1.weight.dtype == torch.float32
    assert_outputs_close(rpq(x), dense_reference(classifier, rpq)(x))
    out = rpq(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert rpq.fc1.weight.codebooks.grad.dtype == dtype
    # model_size is the analytic size: codebooks at 2 bytes, codes at 1, dense leftovers as they are
    converted = [layer for layer in rpq.rpq_layers if layer.converted]
    rpq_bytes = sum(layer.bytes_after for layer in converted)
    expected = sum(layer.num_codebooks * layer.settings.num_codes * layer.codebook_dim * 2
                   + layer.num_codebooks * layer.rows_shape[0] for layer in converted)
    assert rpq_bytes == expected
    dense_leftovers = sum(t.numel() * t.element_size() for n, t in rpq.state_dict().items()
                          if not n.endswith((".codebooks", ".codes")))
    assert rpq_fx.model_size(rpq) * 2**20 == rpq_bytes + dense_leftovers
    row = {r["layer"]: r for r in rpq_fx.report(rpq).rows}["fc1.weight"]
    assert row["codebooks"] == str(dtype).removeprefix("torch.")


def test_report_gives_bits_per_weight_per_layer_and_in_total(classifier):
    rpq = rpq_fx.convert(classifier, codebook_dim=8, shared_codebooks=True, init="kmeans", progress=False)
    rep = rpq_fx.report(rpq)
    fc1 = {r["layer"]: r for r in rep.rows}["fc1.weight"]
    assert fc1["bits/w"] == pytest.approx(8 * (256 * 8 * 4 + 40 * 512) / (512 * 320))
    converted = [r for r in rep.rows if r["init"]]
    total = 8 * sum(r["bytes after"] for r in converted) / sum(eval(r["shape"].replace("x", "*")) for r in converted)
    assert rep.totals["bits_per_weight"] == pytest.approx(total)
    assert "bits per weight" in str(rep)


def test_scalar_weight_sharing_leaves_two_to_the_bits_values_per_layer(classifier):
    rpq = rpq_fx.convert(classifier, codebook_dim=1, num_codes=16, shared_codebooks=True, init="kmeans",
                         calibration=[inputs(5)], progress=False)
    for name, weight in rpq_fx.decompress(rpq).items():
        assert weight.unique().numel() <= 16, name
    assert relative_error(rpq, classifier, inputs(6)) < 0.05


def test_padding_rows_stay_zero_and_tied_weights_stay_one_under_a_calibrated_fit():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(700, 32, padding_idx=0)
            self.head = nn.Linear(32, 700, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens)))

    net = Tied().eval()
    batches = [torch.randint(0, 700, (4, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rpq = rpq_fx.convert(net, codebook_dim=4, init="kmeans", calibration=batches, progress=False)
    dense = rpq_fx.decompress(rpq)
    assert set(dense) == {"embed.weight", "head.weight"} and dense["embed.weight"] is dense["head.weight"]
    assert torch.equal(dense["embed.weight"][0], torch.zeros(32))
    assert_outputs_close(rpq(batches[0]), dense_reference(net, rpq)(batches[0]))


def test_hugging_face_in_place_path_takes_keyword_calibration():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=512, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    batches = [{"input_ids": torch.randint(0, 500, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}]
    rpq = rpq_fx.convert(model, codebook_dim=4, init="kmeans", calibration=batches, progress=False)
    assert any(fit.filled == "kmeans+calibration" for fit in rpq_fx.conversion_record(rpq).fits.values())
    with torch.no_grad():
        out = rpq(**batches[0]).last_hidden_state
        ref = dense_reference(model, rpq)(**batches[0]).last_hidden_state
    assert_outputs_close(out, ref)


def test_bad_fit_settings_get_clear_errors(classifier):
    with pytest.raises(ValueError, match="init must be one of"):
        rpq_fx.convert(classifier, codebook_dim=4, init="pca")
    with pytest.raises(ValueError, match="calibration= makes the k-means fit data-aware"):
        rpq_fx.convert(classifier, codebook_dim=4, calibration=[inputs(0)])
    with pytest.raises(ValueError, match="codebook_dtype must be"):
        rpq_fx.convert(classifier, codebook_dim=4, codebook_dtype="int8")
    with torch.device("meta"):
        meta = Classifier()
    with pytest.raises(rpq_fx.RPQConversionError, match="'conv.weight'.*meta device"):
        rpq_fx.convert(meta, codebook_dim=4, init="kmeans", progress=False)


def test_a_fitted_half_precision_model_saves_and_loads_bit_identical(classifier, tmp_path):
    rpq = rpq_fx.convert(classifier, codebook_dim=4, init="kmeans", codebook_dtype="float16", progress=False)
    path = rpq_fx.save(rpq, tmp_path / "m.safetensors")
    with torch.device("meta"):
        skeleton = Classifier()
    loaded = rpq_fx.load(skeleton.eval(), path)
    x = inputs(3)
    assert torch.equal(loaded(x), rpq(x))
    assert loaded.fc1.weight.codebooks.dtype == torch.float16
    assert rpq_fx.conversion_record(loaded) == rpq_fx.conversion_record(rpq)


def test_error_feedback_is_a_per_layer_setting(classifier):
    calibration = [inputs(seed) for seed in range(20, 22)]
    config = rpq_fx.RPQConfig(codebook_dim=8, shared_codebooks=True, init="kmeans",
                              overrides={"fc1": {"error_feedback": False}})
    off = rpq_fx.convert(classifier, config=config, calibration=calibration, progress=False)
    on = rpq_fx.convert(classifier, codebook_dim=8, shared_codebooks=True, init="kmeans", calibration=calibration,
                        progress=False)
    flags = {layer.name: layer.settings.error_feedback for layer in off.rpq_layers if layer.converted}
    assert flags == {"fc1.weight": False, "fc2.weight": True}
    assert not torch.equal(off.fc1.weight.codes, on.fc1.weight.codes)
    with pytest.raises(ValueError, match="error_feedback must be a bool"):
        rpq_fx.RPQConfig(codebook_dim=8, error_feedback="no")


def test_damp_is_a_per_layer_setting_checked_up_front(classifier):
    calibration = [inputs(seed) for seed in range(20, 22)]
    config = rpq_fx.RPQConfig(codebook_dim=8, shared_codebooks=True, init="kmeans", overrides={"fc1": {"damp": 10.0}})
    damped = rpq_fx.convert(classifier, config=config, calibration=calibration, progress=False)
    default = rpq_fx.convert(classifier, codebook_dim=8, shared_codebooks=True, init="kmeans", calibration=calibration,
                             progress=False)
    assert {layer.name: layer.settings.damp for layer in damped.rpq_layers if layer.converted} == {"fc1.weight": 10.0,
                                                                                         "fc2.weight": 0.01}
    assert not torch.equal(damped.fc1.weight.codes, default.fc1.weight.codes)
    assert_outputs_close(damped(inputs(3)), dense_reference(classifier, damped)(inputs(3)))
    for bad in (0, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"damp must be a number > 0, got"):
            rpq_fx.RPQConfig(codebook_dim=8, damp=bad)
    with pytest.raises(ValueError, match=r"overrides\['fc1'\]: damp must be a number > 0, got 0"):
        rpq_fx.RPQConfig(codebook_dim=8, overrides={"fc1": {"damp": 0}})


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_asymmetric_calibration_corrects_the_error_the_layers_before_pass_on():
    net = trained_like(TwoLayers()).eval()
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g)
    calibration = [torch.randn(512, 16, generator=g) @ mix for _ in range(8)]
    held_out = torch.randn(4096, 16, generator=g) @ mix
    # a coarse first layer (d=8, 16 codes) before a fine second one (scalars, 256 codes) that can make up for it
    settings = dict(codebook_dim=1, shared_codebooks=True, init="kmeans",
                    overrides={"fc1": {"codebook_dim": 8, "num_codes": 16}})
    matched = rpq_fx.convert(net, config=rpq_fx.RPQConfig(**settings), calibration=calibration, progress=False)
    plain = rpq_fx.convert(net, config=rpq_fx.RPQConfig(**settings, asymmetric=False), calibration=calibration,
                           progress=False)
    assert torch.equal(matched.fc1.weight.codes, plain.fc1.weight.codes), "fc1 sees the dense inputs: one fit"
    assert_outputs_close(matched(held_out), dense_reference(net, matched)(held_out))
    assert relative_error(matched, net, held_out) < 0.7 * relative_error(plain, net, held_out)
    assert {layer.name: layer.settings.asymmetric for layer in plain.rpq_layers} == {"fc1.weight": False,
                                                                                     "fc2.weight": False}
    with pytest.raises(ValueError, match="asymmetric must be a bool"):
        rpq_fx.RPQConfig(codebook_dim=8, asymmetric=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_weight_is_refused_naming_the_layer_and_the_value(classifier, bad):
    net = copy.deepcopy(classifier)
    with torch.no_grad():
        net.fc1.weight[7, 3] = bad
    with pytest.raises(rpq_fx.RPQConversionError, match=rf"'fc1.weight'.* 1 non-finite value.*{bad}.*\[7, 3\]"):
        rpq_fx.convert(net, codebook_dim=4, init="kmeans", progress=False)


def test_non_finite_calibration_statistics_are_refused_naming_the_layer(classifier):
    calibration = [inputs(seed) for seed in range(10, 13)]
    calibration[1][0, 2, 3, 4] = float("nan")
    with pytest.raises(rpq_fx.RPQConversionError, match=r"'conv.weight'.*calibration.*non-finite.*calibration item 1\)"):
        rpq_fx.convert(classifier, codebook_dim=4, init="kmeans", calibration=calibration, progress=False)


@pytest.mark.parametrize("empty", [[], iter([]), (x for x in ())], ids=["list", "iterator", "generator"])
def test_calibration_without_items_is_refused(classifier, empty):
    with pytest.raises(ValueError, match=r"calibration= holds no items.*used up.*calibration=None"):
        rpq_fx.convert(classifier, codebook_dim=4, init="kmeans", calibration=empty, progress=False)


def test_a_calibration_item_the_model_cannot_take_is_named_with_the_layer_it_failed_in():
    net = trained_like(nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 300))).eval()
    calibration = [torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 17)]
    with pytest.raises(rpq_fx.RPQConversionError,
                       match=r"calibration item 2 \(Tensor \[4, 17\]\).* layer '0' \(Linear\).*mat1 and mat2"):
        rpq_fx.convert(net, codebook_dim=4, init="kmeans", calibration=calibration, progress=False)
    with pytest.raises(rpq_fx.RPQConversionError, match=r"calibration item 0 \(tuple of 2\).*forward\(\)"):
        rpq_fx.convert(net, codebook_dim=4, init="kmeans", calibration=[(torch.randn(4, 16),) * 2], progress=False)
