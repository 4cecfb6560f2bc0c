"""hot_rows: the rows whose error weighs most get a second, residual code (RPQWeight.hot)."""

import copy

import pytest
import torch
from torch import nn

import rpq_fx
from conftest import assert_outputs_close, dense_reference
from rpq_fx.nn.weight import RPQWeight
from rpq_fx.ops import expand

VOCAB, DIM = 600, 32


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.mix = nn.Linear(DIM, 256)
        self.out = nn.Linear(256, 8)

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def zipf_tokens(seed: int, batches: int = 4) -> list[torch.Tensor]:
    """Tokens 1..99 only, the low ones far more often (as words are): 100..599 never occur."""
    g = torch.Generator().manual_seed(seed)
    probs = 1 / torch.arange(1, 100, dtype=torch.float64)
    return [torch.multinomial(probs, 8 * 16, replacement=True, generator=g).view(8, 16) + 1 for _ in range(batches)]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TinyLM().eval()


def convert(model, calibration, **settings):
    """A calibrated fit whose later layers do not make up for the embedding's error (``asymmetric``):
    the output error measures the embedding's own fit."""
    config = rpq_fx.RPQConfig(codebook_dim=8, shared_codebooks=True, init="kmeans", asymmetric=False, **settings)
    return rpq_fx.convert(model, config=config, calibration=calibration, progress=False)


def output_error(model, original, tokens) -> float:
    with torch.no_grad():
        return float(sum((model(t) - original(t)).square().sum() for t in tokens)
                     / sum(original(t).square().sum() for t in tokens))


def test_rpq_weight_adds_the_hot_rows_residual_to_their_rows():
    weight = RPQWeight(4, 8, 50, 16, True, hot_rows=5, hot_codebook_dim=2)
    with torch.no_grad():
        weight.hot.codebooks.normal_()
        weight.hot_index.copy_(torch.tensor([3, 0, 49, 17, 8]))
    expected = torch.stack([torch.cat([weight.codebooks[0, weight.codes[c, n].long()] for c in range(4)])
                            for n in range(50)])
    for h, row in enumerate(weight.hot_index.tolist()):
        expected[row] += torch.cat([weight.hot.codebooks[0, weight.hot.codes[c, h].long()] for c in range(16)])
    torch.testing.assert_close(weight(), expected)
    assert (weight() != expand(weight.codebooks, weight.codes)).any(1).nonzero().view(-1).tolist() == [0, 3, 8, 17, 49]


def test_a_fresh_hot_part_adds_nothing_and_skips_the_padding_rows():
    weight = RPQWeight(4, 8, 50, hot_rows=6, hot_codebook_dim=4)
    weight.reset_parameters("normal", zero_rows=(0, 2))
    assert weight.hot_index.tolist() == [1, 3, 4, 5, 6, 7]
    assert torch.equal(weight(), expand(weight.codebooks, weight.codes))
    with pytest.raises(ValueError, match="hot_rows=49 exceed the 48 rows"):
        RPQWeight(4, 8, 50, hot_rows=49, hot_codebook_dim=4).reset_parameters(zero_rows=(0, 2))


def test_hot_rows_go_to_the_most_looked_up_tokens_and_lower_the_error(lm):
    calibration, held_out = zipf_tokens(0), zipf_tokens(1)
    plain = convert(lm, calibration)
    hot = convert(lm, calibration, hot_rows=24, hot_codebook_dim=2)
    weight = hot.embed.weight
    index = set(weight.hot_index.tolist())
    # the rows of the plain fit whose error weighs most: lookups in calibration (+ one mean lookup each), never padding
    counts = torch.bincount(torch.cat(calibration).view(-1), minlength=VOCAB).double()
    errors = (lm.embed.weight - rpq_fx.decompress(plain)["embed.weight"]).double().square().sum(1)
    weighted = (counts + counts[1:].sum() / (VOCAB - 1)) * errors
    weighted[0] = -1
    assert set(weight.hot_index.tolist()) == set(weighted.topk(24).indices.tolist())
    assert torch.equal(rpq_fx.decompress(hot)["embed.weight"][0], torch.zeros(DIM))
    assert_outputs_close(hot(held_out[0]), dense_reference(lm, hot)(held_out[0]))
    layer = {layer.name: layer for layer in hot.rpq_layers}["embed.weight"]
    plain_layer = {layer.name: layer for layer in plain.rpq_layers}["embed.weight"]
    hot_rows = weight.hot_index.long()
    left = (lm.embed.weight - rpq_fx.decompress(hot)["embed.weight"])[hot_rows].double().square().sum(1)
    assert (left * weighted[hot_rows] / errors[hot_rows]).sum() < 0.1 * weighted[hot_rows].sum()
    fit, plain_fit = (rpq_fx.conversion_record(m).fits["embed.weight"] for m in (hot, plain))
    assert fit.error < plain_fit.error
    assert output_error(hot, lm, held_out) < 0.8 * output_error(plain, lm, held_out)
    stored = [weight.codebooks, weight.codes, weight.hot.codebooks, weight.hot.codes, weight.hot_index]
    assert layer.bytes_after == sum(t.numel() * t.element_size() for t in stored)
    assert layer.bytes_after - plain_layer.bytes_after == 256 * 2 * 4 + 16 * 24 + 4 * 24
    row = next(r for r in rpq_fx.report(hot).rows if r["layer"] == "embed.weight")
    assert row["bits/w"] == pytest.approx(8 * layer.bytes_after / (VOCAB * DIM)) and "hot: 24 rows, d=2" in row["note"]


def test_a_linear_layers_hot_rows_lower_its_output_error(lm):
    calibration, held_out = zipf_tokens(0), zipf_tokens(1)
    skip_embed = {"embed": {"skip": True}}
    plain = convert(lm, calibration, overrides=skip_embed)
    hot = convert(lm, calibration, hot_rows=64, hot_codebook_dim=4, overrides=skip_embed)
    assert hot.mix.weight.hot.num_vectors == 64 and isinstance(hot.out.weight, nn.Parameter)  # out would grow
    assert_outputs_close(hot(held_out[0]), dense_reference(lm, hot)(held_out[0]))
    assert output_error(hot, lm, held_out) < 0.8 * output_error(plain, lm, held_out)


def test_hot_rows_save_load_and_train(lm, tmp_path):
    calibration = zipf_tokens(0)
    hot = convert(lm, calibration, hot_rows=24, hot_codebook_dim=2)
    rpq_fx.save(hot, tmp_path / "lm.safetensors")
    loaded = rpq_fx.load(copy.deepcopy(lm), tmp_path / "lm.safetensors")
    assert torch.equal(loaded.embed.weight.hot_index, hot.embed.weight.hot_index)
    assert torch.equal(loaded(calibration[0]), hot(calibration[0]))
    hot_codebooks = hot.embed.weight.hot.codebooks
    groups = rpq_fx.param_groups(hot, lr=1e-2)
    assert any(group["params"][0] is hot_codebooks for group in groups)
    before = hot_codebooks.detach().clone()
    optimizer = torch.optim.Adam(groups)
    rpq_fx.distillation_loss(hot(calibration[1]), lm(calibration[1]).detach()).backward()
    optimizer.step()
    assert not torch.equal(hot_codebooks, before)
    assert torch.equal(rpq_fx.decompress(hot)["embed.weight"][0], torch.zeros(DIM))  # padding stays zero


def test_bad_hot_settings_get_clear_errors(lm):
    with pytest.raises(ValueError, match="hot_codebook_dim"):
        rpq_fx.RPQConfig(codebook_dim=8, hot_rows=4)
    with pytest.raises(ValueError, match="hot_rows must be an int >= 0, got -1"):
        rpq_fx.RPQConfig(codebook_dim=8, hot_rows=-1, hot_codebook_dim=2)
    with pytest.raises(ValueError, match=r"overrides\['embed'\].*hot_codebook_dim"):
        rpq_fx.RPQConfig(codebook_dim=8, overrides={"embed": {"hot_rows": 4}})
    original = copy.deepcopy(lm.state_dict())
    converted = convert(lm, zipf_tokens(0), hot_rows=4, hot_codebook_dim=3)
    layer = {layer.name: layer for layer in converted.rpq_layers}["embed.weight"]
    assert layer.reason == "row length 32 is not divisible by hot_codebook_dim=3"
    with pytest.raises(rpq_fx.RPQConversionError, match="embed.weight.*hot_codebook_dim=3"):
        rpq_fx.convert(lm, config=rpq_fx.RPQConfig(codebook_dim=8, hot_rows=4, hot_codebook_dim=3), strict=True,
                       progress=False)
    assert all(torch.equal(v, original[k]) for k, v in lm.state_dict().items())


def _targets(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_function"]


def test_an_embedding_with_hot_rows_is_looked_up_in_the_compressed_domain_with_the_dense_gradients(lm):
    calibration = zipf_tokens(0)
    hot = convert(lm, calibration, hot_rows=24, hot_codebook_dim=2)
    assert torch.ops.rpq_fx.embedding.default in _targets(hot) and rpq_fx.ops.hot_embedding in _targets(hot)
    tokens = torch.cat([hot.embed.weight.hot_index[:8].long(), torch.tensor([0, 0, 5, 99, 300, 599])]).view(2, 7)
    weight = hot.embed.weight
    fused = hot(tokens)
    reference = dense_reference(lm, hot)
    assert_outputs_close(fused, reference(tokens))
    fused.square().sum().backward()
    unfused = torch.func.functional_call(reference, {"embed.weight": weight()}, (tokens,))  # expanded whole
    expected = torch.autograd.grad(unfused.square().sum(), [weight.codebooks, weight.hot.codebooks])
    torch.testing.assert_close(weight.codebooks.grad, expected[0])
    torch.testing.assert_close(weight.hot.codebooks.grad, expected[1])
    assert weight.hot.codebooks.grad.abs().sum() > 0


def test_a_lookup_that_scales_gradients_by_frequency_keeps_the_expansion():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM, scale_grad_by_freq=True)

        def forward(self, tokens):
            return self.embed(tokens)

    net = Scaled()
    hot = convert(net, zipf_tokens(0), hot_rows=24, hot_codebook_dim=2)
    assert torch.ops.rpq_fx.expand.default in _targets(hot) and rpq_fx.ops.hot_embedding not in _targets(hot)
    tokens = zipf_tokens(1)[0]
    assert_outputs_close(hot(tokens), dense_reference(net, hot)(tokens))
