"""Additive codebooks (``additive_codebooks`` M): every path against a dense weight summed here by plain indexing."""

import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import rpq_fx
from rpq_fx import RPQCheckpointError
from rpq_fx.fit.additive import fit_additive
from rpq_fx.fit.quantize import fit_rows
from rpq_fx.nn.layers import RPQConv2d, RPQEmbedding, RPQLinear
from rpq_fx.nn.weight import RPQWeight
from rpq_fx.passes import is_expansion
from test_io_hostile import craft


def same_file(a, b) -> bool:
    """The same metadata and tensors, byte for byte (safetensors writes its metadata keys in no fixed order)."""
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                and all(fa.get_tensor(k).dtype == fb.get_tensor(k).dtype
                        and torch.equal(fa.get_tensor(k).view(-1).view(torch.uint8),
                                        fb.get_tensor(k).view(-1).view(torch.uint8)) for k in fa.keys()))


def stage_rows(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[N, C*d]`` of one stage, by plain indexing: row n, slice c reads ``codebooks[c or 0, codes[c, n]]``."""
    groups, num = codebooks.shape[0], codes.shape[0]
    group = torch.arange(num)[:, None] if groups > 1 else torch.zeros(num, 1, dtype=torch.long)
    return codebooks[group, codes.long()].permute(1, 0, 2).reshape(codes.shape[1], -1)


def reference_rows(weight: RPQWeight) -> torch.Tensor:
    """The dense rows of ``weight``: its own stage, each additive stage summed, then hot rows added."""
    parts = [(weight.codebooks, weight.codes)] + [(s.codebooks, s.codes) for s in weight.additive or ()]
    rows = sum(stage_rows(cb, codes) for cb, codes in parts)
    if weight.hot is not None:
        rows = rows.clone()
        rows[weight.hot_index.long()] += stage_rows(weight.hot.codebooks, weight.hot.codes)
    return rows


def randomise(weight: RPQWeight, seed: int = 0) -> None:
    """Nonzero codebooks in every stage (additive stages start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in [weight, *weight.parts()]:
            part.codebooks.copy_(torch.randn(part.codebooks.shape, generator=g))


def codebook_grads(weight: RPQWeight) -> list[torch.Tensor]:
    return [p.codebooks.grad.clone() for p in [weight, *weight.parts()]]


def leaf_codebooks(weight: RPQWeight) -> list[torch.Tensor]:
    """Leaf copies of every codebook, in :func:`codebook_grads` order, for a reference to differentiate."""
    return [p.codebooks.detach().clone().requires_grad_() for p in [weight, *weight.parts()]]


def reference_from_leaves(weight: RPQWeight, leaves: list[torch.Tensor]) -> torch.Tensor:
    stages = [weight, *(weight.additive or ())]
    rows = sum(stage_rows(cb, s.codes) for cb, s in zip(leaves, stages))
    if weight.hot is not None:
        rows = rows.index_add(0, weight.hot_index.long(), stage_rows(leaves[-1], weight.hot.codes))
    return rows


@settings(max_examples=12, deadline=None)
@given(m=st.integers(2, 3), shared=st.booleans(), c=st.integers(1, 4), d=st.integers(1, 5), out=st.integers(1, 9),
       batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_linear_forward_and_backward_match_the_summed_dense_weight(m, shared, c, d, out, batch, seed):
    torch.manual_seed(seed)
    layer = RPQLinear(c * d, out, c, num_codes=8, shared_codebooks=shared, additive_codebooks=m)
    randomise(layer.weight, seed)
    assert layer.weight.additive_codebooks == m and len(layer.weight.additive) == m - 1
    x = torch.randn(batch, c * d, requires_grad=True)
    leaves = leaf_codebooks(layer.weight)
    dense = reference_from_leaves(layer.weight, leaves)
    torch.testing.assert_close(layer.weight(), dense.detach())
    y, ref = layer(x), F.linear(x, dense, layer.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_grad = x.grad.clone()
    x.grad = None
    ref.backward(grad)
    torch.testing.assert_close(x_grad, x.grad, atol=1e-5, rtol=1e-5)
    for got, leaf in zip(codebook_grads(layer.weight), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_embedding_with_padding_and_hot_rows(m, shared):
    torch.manual_seed(m)
    layer = RPQEmbedding(40, 12, 3, padding_idx=2, num_codes=8, shared_codebooks=shared, additive_codebooks=m)
    assert torch.equal(layer.weight()[2], torch.zeros(12)), "a padding row starts at zero in every stage"
    hot = RPQWeight(3, 4, 40, 8, shared, hot_rows=5, hot_codebook_dim=4, additive_codebooks=m)
    hot.reset_parameters("normal", zero_rows=(2,))
    randomise(hot, m)
    layer.weight = hot
    ids = torch.tensor([[0, 2, 5, 5], [hot.hot_index[0].item(), 39, 1, 2]])
    leaves = leaf_codebooks(hot)
    dense = reference_from_leaves(hot, leaves)
    torch.testing.assert_close(hot.expand_rows(), reference_rows(hot))
    out, ref = layer(ids), F.embedding(ids, dense, padding_idx=2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for got, leaf in zip(codebook_grads(hot), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


def test_conv_expands_the_sum_and_a_gradcheck_passes():
    torch.manual_seed(0)
    conv = RPQConv2d(3, 4, 3, padding=1, num_codebooks=9, num_codes=4, additive_codebooks=2, dtype=torch.float64)
    randomise(conv.weight)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    dense = reference_rows(conv.weight).view(4, 3, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, dense, conv.bias, padding=1))
    stage = conv.weight.additive[0]

    def through_stage(cb):
        return F.conv2d(x, stage_rows(conv.weight.codebooks, conv.weight.codes).view(4, 3, 3, 3)
                        + torch.ops.rpq_fx.expand(cb, stage.codes).view(4, 3, 3, 3), conv.bias, padding=1)

    assert torch.autograd.gradcheck(through_stage, (stage.codebooks.detach().clone().requires_grad_(),))


def test_sizes_count_every_stage():
    one = RPQWeight(8, 4, 512, 256, True)
    three = RPQWeight(8, 4, 512, 256, True, additive_codebooks=3)
    size = sum(t.numel() * t.element_size() for t in [*three.parameters(), *three.buffers()])
    assert size == 3 * sum(t.numel() * t.element_size() for t in [*one.parameters(), *one.buffers()])
    assert [name for name, _ in rpq_fx.nn.weight.rpq_weights(nn.ModuleDict({"w": three}))] == ["w"]
    with pytest.raises(ValueError, match="additive_codebooks must be an int >= 1, got 0"):
        RPQWeight(8, 4, 512, additive_codebooks=0)


# ---------------------------------------------------------------------------------------------------
# converted models


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(300, 32)
        self.conv = nn.Conv1d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 288)
        self.fc2 = nn.Linear(288, 300)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.relu(self.fc1(h)))


def dense_reference(model: nn.Module, converted: nn.Module) -> nn.Module:
    """``model`` with every converted weight replaced by the sum of its stages, summed here."""
    reference = Net()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in rpq_fx.nn.weight.rpq_weights(converted):
            getattr(reference, name.split(".")[0]).weight.copy_(reference_rows(weight).view(weight.shape))
    return reference


IDS = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
CONFIG = dict(codebook_dim=8, num_codes=16, additive_codebooks=2)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_converted_graph_shows_the_sum_and_matches_the_summed_weights(checkpoint):
    torch.manual_seed(0)
    model = Net()
    config = rpq_fx.RPQConfig(**CONFIG, overrides={"fc2": {"additive_codebooks": 3, "shared_codebooks": True},
                                                   "emb": {"hot_rows": 4, "hot_codebook_dim": 8}},
                              checkpoint=checkpoint)
    converted = rpq_fx.convert(model, config=config, progress=False)
    for _, weight in rpq_fx.nn.weight.rpq_weights(converted):
        randomise(weight)
    code = converted.code
    if not checkpoint:
        assert "fc1_stage_1 = torch.ops.rpq_fx.linear.default" in code and "fc2_stage_2" in code
        assert "emb_stage_1 = torch.ops.rpq_fx.embedding.default" in code and "hot_embedding" in code
    nodes = list(converted.graph.nodes)
    expands = [n for n in nodes if is_expansion(n)]
    if checkpoint:  # the conv's whole sum, with its conv, recomputed in backward: no expansion left outside
        assert sum(n.target is torch.utils.checkpoint.checkpoint for n in nodes) == 1 and not expands
    else:  # the conv weight is expanded as a sum
        assert len(expands) == 2 and any(n.op == "call_method" and n.target == "add" and n.args[1] is expands[1]
                                         for n in nodes)
    reference = dense_reference(model, converted)
    out, ref = converted(IDS), reference(IDS)
    # reason: N(0, 1) codebooks give outputs in the hundreds; the sum per stage rounds apart from the summed weight
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    stage = converted.fc1.weight.additive[0]
    # the stage's codebook gradient, by the chain rule through the summed dense weight
    expected = torch.ops.rpq_fx.expand_backward(reference.fc1.weight.grad, stage.codes, stage.codebooks.shape[0], 16)
    torch.testing.assert_close(stage.codebooks.grad, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    dense = rpq_fx.decompress(converted)
    torch.testing.assert_close(dense["fc2.weight"], reference.fc2.weight.detach())


def test_one_stage_is_todays_weight_graph_and_file(tmp_path):
    torch.manual_seed(0)
    model = Net()
    plain = rpq_fx.convert(model, config=rpq_fx.RPQConfig(codebook_dim=8, num_codes=16), progress=False)
    explicit = rpq_fx.convert(model, config=rpq_fx.RPQConfig(codebook_dim=8, num_codes=16, additive_codebooks=1,
                                                             overrides={"fc1": {"shared_codebooks": False}}),
                              progress=False)
    assert "additive" not in plain.code and not any("additive" in k for k in plain.state_dict())
    assert torch.equal(plain(IDS), explicit(IDS))
    path = rpq_fx.save(plain, tmp_path / "plain.safetensors")
    with safe_open(path, "pt") as f:
        text = f.metadata()["rpq_fx"]
    assert "additive" not in text, "a one-stage model writes what rpq_fx wrote before the setting existed"
    loaded = rpq_fx.load(Net(), path)
    assert same_file(rpq_fx.save(loaded, tmp_path / "again.safetensors"), path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    config = rpq_fx.RPQConfig(**CONFIG, init="kmeans", overrides={"emb": {"hot_rows": 4, "hot_codebook_dim": 8}})
    converted = rpq_fx.convert(model, config=config, progress=False)
    path = rpq_fx.save(converted, tmp_path_factory.mktemp("additive") / "m.safetensors")
    return converted, path


def test_save_and_load_are_bit_identical(saved, tmp_path):
    converted, path = saved
    loaded = rpq_fx.load(Net(), path)
    assert torch.equal(loaded(IDS), converted(IDS))
    for (name, a), (_, b) in zip(converted.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.fc1.weight.additive_codebooks == 2
    info = json.loads(safe_open(path, "pt").metadata()["rpq_fx"])
    assert info["config"]["additive_codebooks"] == 2
    assert all(layer["settings"]["additive_codebooks"] == 2 for layer in info["layers"] if layer["settings"])
    assert same_file(rpq_fx.save(loaded, tmp_path / "again.safetensors"), path)


@pytest.mark.parametrize("key, value, message", [
    ("fc1.weight.additive.0.codes", torch.full((8, 288), 16, dtype=torch.uint8),
     r"fc1.weight.additive.0.codes: code 16 is out of range for 16 codewords"),
    ("fc1.weight.additive.0.codes", torch.zeros(8, 288, dtype=torch.int64),
     r"'fc1.weight.additive.0.codes' is \[8, 288\] int64 in the file, \[8, 288\] uint8"),
    ("conv.weight.additive.0.codebooks", torch.zeros(12, 17, 8),
     r"'conv.weight.additive.0.codebooks' is \[12, 17, 8\] float32 in the file, \[12, 16, 8\] float32"),
])
def test_a_stage_edited_in_the_file_is_refused(saved, tmp_path, check, key, value, message):
    path = craft(tmp_path / "m.safetensors", source=saved[1], tensors={key: value})
    model = Net()
    before = check.snapshot(model)
    with pytest.raises(RPQCheckpointError, match=message):
        rpq_fx.load(model, path)
    check.unchanged(model, before)


def _set_stages(value, where):
    def edit(info):
        if where == "config":
            info["config"]["additive_codebooks"] = value
        else:
            next(layer for layer in info["layers"] if layer["settings"])["settings"]["additive_codebooks"] = value
    return edit


@pytest.mark.parametrize("value, where, message", [
    (0, "layer", r"layers\[0\].settings: LayerSettings: additive_codebooks must be an int in \[1, 16\], got 0"),
    ("2", "layer", r"additive_codebooks must be an int in \[1, 16\], got '2'"),
    (3, "layer", r"saved 3, here 2"),
    (10**9, "config", r"additive_codebooks must be an int in \[1, 16\], got 1000000000"),
    (3, "config", r"tensors do not match this model's|different result"),
])
def test_a_crafted_stage_count_is_refused(saved, tmp_path, value, where, message):
    path = craft(tmp_path / "m.safetensors", source=saved[1], edit=_set_stages(value, where))
    with pytest.raises(RPQCheckpointError, match=message):
        rpq_fx.load(Net(), path)


# ---------------------------------------------------------------------------------------------------
# fit


def test_residual_fit_beats_one_stage_and_refinement_never_hurts():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(256, 32, generator=g)
    inputs = torch.randn(512, 32, generator=g) * torch.linspace(0.2, 2, 32)
    hessian = inputs.T @ inputs
    one = fit_rows(rows, 8, 16, True, hessian=hessian)
    kept = hessian.clone()
    greedy = dict(joint_rounds=0, product_start=False)  # the residual fit and its refits alone
    stages, error = fit_additive(rows, 2, 8, 16, True, hessian=hessian, damp=0.01, rounds=0, **greedy)
    assert torch.equal(hessian, kept), "the Gram matrix is read, not overwritten"
    refined, refined_error = fit_additive(rows, 2, 8, 16, True, hessian=hessian, damp=0.01, rounds=2, **greedy)
    summed = sum(stage_rows(s.codebooks.float(), s.codes) for s in refined)
    delta = rows - summed
    assert refined_error == pytest.approx(float(((delta @ hessian) * delta).sum() / ((rows @ hessian) * rows).sum()),
                                          rel=1e-4)
    assert refined_error <= error < 0.7 * one.error


def test_convert_fits_every_stage_with_and_without_calibration():
    torch.manual_seed(0)
    model = Net().eval()
    calibration = [torch.randint(0, 300, (4, 16)) for _ in range(4)]
    errors = {}
    for m in (1, 2):
        for data in (None, calibration):
            config = rpq_fx.RPQConfig(codebook_dim=8, num_codes=16, init="kmeans", additive_codebooks=m)
            converted = rpq_fx.convert(model, config=config, calibration=data, progress=False)
            fits = rpq_fx.conversion_record(converted).fits
            errors[m, data is None] = {name: fit.error for name, fit in fits.items()}
            if m == 2:
                assert all(w.additive[0].codebooks.abs().sum() > 0 for _, w in rpq_fx.nn.weight.rpq_weights(converted))
                reference = dense_reference(model, converted)
                torch.testing.assert_close(converted(IDS), reference(IDS), atol=1e-4, rtol=1e-4)
    for plain in (True, False):
        for name, error in errors[2, plain].items():
            assert error < 0.8 * errors[1, plain][name], (name, plain)


def test_hugging_face_round_trip(tmp_path):
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                 vocab_size=512, max_position_embeddings=64)).eval()
    converted = rpq_fx.convert(model, codebook_dim=16, num_codes=16, additive_codebooks=2, init="kmeans",
                               progress=False)
    converted.save_pretrained(tmp_path / "rpq")
    quant = json.loads((tmp_path / "rpq" / "config.json").read_text())["quantization_config"]
    assert quant["rpq_config"]["additive_codebooks"] == 2
    loaded = AutoModel.from_pretrained(tmp_path / "rpq")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, converted(input_ids=ids).last_hidden_state)
    assert loaded.encoder.layer[0].output.dense.weight.additive_codebooks == 2


def test_allocate_picks_additive_sizes_by_their_stored_bits():
    torch.manual_seed(0)
    model = Net().eval()
    calibration = [torch.randint(0, 300, (4, 16)) for _ in range(2)]
    sizes = [{"codebook_dim": 4, "num_codes": 16}, {"codebook_dim": 8, "num_codes": 16, "additive_codebooks": 2}]
    costs = rpq_fx.size_costs(model, calibration, sizes=sizes, progress=False)
    for options in costs.options.values():
        # same codes per value (one byte per 4 values); the additive size's codebooks are stored twice
        assert options[1].size["additive_codebooks"] == 2 and options[1].bits > options[0].bits
    config = costs.config(10.0)
    converted = rpq_fx.convert(model, config=config, calibration=calibration, progress=False)
    assert {w.additive_codebooks for _, w in rpq_fx.nn.weight.rpq_weights(converted)} <= {1, 2}
    assert rpq_fx.report(converted).totals["bits_per_weight"] <= 10.0


def test_onnx_export_sums_the_stages(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Net().eval()
    converted = rpq_fx.convert(model, config=rpq_fx.RPQConfig(**CONFIG), progress=False).eval()
    for _, weight in rpq_fx.nn.weight.rpq_weights(converted):
        randomise(weight)
    path = rpq_fx.export_onnx(converted, (IDS,), tmp_path / "additive.onnx")
    session = ort.InferenceSession(str(path))
    (actual,) = session.run(None, {session.get_inputs()[0].name: IDS.numpy()})
    with torch.no_grad():
        expected = dense_reference(model, converted)(IDS)
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


def test_a_fitted_padding_row_stays_zero_in_every_stage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 32, padding_idx=5))
    converted = rpq_fx.convert(model, codebook_dim=8, num_codes=16, init="kmeans", additive_codebooks=3,
                               progress=False)
    weight = converted.get_submodule("0.weight")
    for stage in weight.stages():
        assert (stage.codes[:, 5] == 15).all() and not stage.codebooks[:, 15].any()
        assert (stage.codes[:, :5] < 15).all() and stage.codebooks[:, :15].abs().sum() > 0
    assert not rpq_fx.decompress(converted)["0.weight"][5].any()
    torch.testing.assert_close(rpq_fx.decompress(converted)["0.weight"], reference_rows(weight))
