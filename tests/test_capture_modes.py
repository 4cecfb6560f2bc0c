"""``convert(model, capture=...)``: module capture keeps the model's class with real RPQ layers;
``inplace`` returns the same object there and leaves a consumed original that says so on fx; a
wrapped model is refused; a Hugging Face causal LM exports with plain ``input_ids``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx.graph_module import graph_parts
from rpq_fx.nn import RPQConv1d, RPQConv2d, RPQEmbedding, RPQLinear, RPQWeight

SETTINGS = dict(codebook_dim=4, num_codes=16)


class Net(nn.Module):
    """Every layer module capture swaps for an RPQ layer, a tied embedding / head and a method of its own."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(96, 32, padding_idx=3)
        self.conv = nn.Conv1d(32, 48, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(48, 32)
        self.head = nn.Linear(32, 96, bias=False)
        self.head.weight = self.embed.weight
        self.note = "kept"

    def features(self, ids):
        h = self.embed(ids).transpose(1, 2)
        return self.fc(F.relu(self.conv(h)).transpose(1, 2))

    def forward(self, ids):
        return self.head(self.features(ids))


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so ``auto`` falls back to module capture."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 64)
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 48)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = -h
        return self.head(self.mha(h, h, h, need_weights=False)[0])


def ids():
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def test_module_capture_keeps_the_class_with_real_rpq_layers(check):
    model = Net().eval()
    before = check.snapshot(model)
    converted = rpq_fx.convert(model, capture="module", **SETTINGS)
    check.unchanged(model, before)
    assert type(converted) is Net and converted is not model and converted.note == "kept"
    assert rpq_fx.conversion_record(converted).path == "module"
    assert type(converted.embed) is RPQEmbedding and converted.embed.padding_idx == 3
    assert type(converted.conv) is RPQConv1d and converted.conv.padding_mode == "reflect"
    assert type(converted.fc) is RPQLinear and (converted.fc.in_features, converted.fc.out_features) == (48, 32)
    assert type(converted.head) is RPQLinear
    assert converted.head.weight is converted.embed.weight, "the tied weight must stay one RPQ weight"
    assert len([m for m in converted.modules() if isinstance(m, RPQWeight)]) == 3
    reference = check.matches_dense_reference(model, converted, ids())
    with torch.no_grad():
        check.outputs_close(converted.features(ids()), reference.features(ids()))


def test_module_capture_trains_the_codebooks_like_the_dense_reference(check):
    model = Net().train()
    converted = rpq_fx.convert(model, capture="module", **SETTINGS)
    reference = check.dense_reference(model, converted)
    converted(ids()).square().mean().backward()
    reference(ids()).square().mean().backward()
    for rpq, dense in ((converted.fc, reference.fc), (converted.conv, reference.conv)):
        torch.testing.assert_close(rpq.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-7)
        assert rpq.weight.codebooks.grad.abs().sum() > 0
    assert converted.fc.weight.codes.grad is None


def test_inplace_module_capture_returns_the_same_object():
    model = Net().eval()
    bias = model.fc.bias
    converted = rpq_fx.convert(model, capture="module", inplace=True, **SETTINGS)
    assert converted is model
    assert type(model.fc) is RPQLinear and model.fc.bias is bias
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 and name.endswith("fc.weight")
                   for name, p in model.named_parameters())
    model(ids())


def test_inplace_fx_consumes_the_original_and_calling_it_says_so(check):
    model = Net().eval()
    reference = copy.deepcopy(model)
    converted = rpq_fx.convert(model, inplace=True, **SETTINGS)
    assert isinstance(converted, rpq_fx.RPQGraphModule)
    with pytest.raises(rpq_fx.RPQConversionError, match=r"Net was consumed by rpq_fx.convert\(\.\.\., inplace=True\)"):
        model(ids())
    with pytest.raises(rpq_fx.RPQConversionError, match=r"'fc' of Net was consumed"):
        model.fc(torch.randn(2, 48))
    check.matches_dense_reference(reference, converted, ids())


def test_auto_falls_back_to_module_capture_with_rpq_layers(check):
    model = Branchy().eval()
    converted = rpq_fx.convert(model, **SETTINGS)
    assert type(converted) is Branchy
    assert rpq_fx.conversion_record(converted).path.startswith("in place (TraceError")
    assert type(converted.fc) is RPQLinear and type(converted.head) is RPQLinear
    assert isinstance(converted.mha, rpq_fx.RPQGraphModule), "a layer without an RPQ class keeps its graph"
    assert converted.mha.embed_dim == 64
    x = torch.randn(2, 5, 16)
    check.matches_dense_reference(model, converted, x)
    check.matches_dense_reference(model, converted, -x)


def test_capture_choices_are_checked():
    with pytest.raises(ValueError, match=r"capture must be one of \['auto', 'fx', 'export', 'module'\], got 'jit'"):
        rpq_fx.convert(Net(), capture="jit", **SETTINGS)
    with pytest.raises(ValueError, match="capture='export' needs example_inputs"):
        rpq_fx.convert(Net(), capture="export", **SETTINGS)
    with pytest.raises(ValueError, match="example_inputs are for capture='export'; capture='module'"):
        rpq_fx.convert(Net(), capture="module", example_inputs=ids(), **SETTINGS)
    with pytest.raises(rpq_fx.RPQConversionError, match="torch.fx could not trace Branchy"):
        rpq_fx.convert(Branchy(), capture="fx", **SETTINGS)
    with pytest.raises(rpq_fx.RPQConversionError, match="bare Linear; use capture='fx'"):
        rpq_fx.convert(nn.Linear(64, 64), capture="module", **SETTINGS)
    exported = rpq_fx.convert(Net().eval(), capture="export", example_inputs=(ids(),), **SETTINGS)
    assert rpq_fx.conversion_record(exported).path == "torch.export"


def test_module_capture_with_checkpointing_keeps_checkpointed_convs_as_graphs(check):
    model = Net().train()
    converted = rpq_fx.convert(model, capture="module", checkpoint=True, **SETTINGS)
    assert isinstance(converted.conv, rpq_fx.RPQGraphModule)
    assert "checkpoint" in converted.conv.code
    assert type(converted.fc) is RPQLinear  # computes in the compressed domain: no dense weight to recompute
    check.matches_dense_reference(model.eval(), converted.eval(), ids())


@pytest.mark.parametrize("variant", ["hot_rows", "float16_codebooks"])
def test_rpq_layers_read_hot_rows_and_half_codebooks_as_the_graph_path_does(check, variant):
    extra = dict(hot_rows=8, hot_codebook_dim=2) if variant == "hot_rows" else dict(codebook_dtype="float16")
    model = Net().eval()
    module = rpq_fx.convert(model, capture="module", config=rpq_fx.RPQConfig(**SETTINGS, **extra))
    assert type(module.embed) is RPQEmbedding and type(module.conv) is RPQConv1d
    if variant == "hot_rows":
        assert module.embed.weight.hot is not None
    else:
        assert module.fc.weight.codebooks.dtype == torch.float16 and module.fc.weight.dtype == torch.float32
    check.matches_dense_reference(model, module, ids())


def test_module_capture_round_trips_through_save_and_load(tmp_path):
    converted = rpq_fx.convert(Branchy().eval(), init="kmeans", **SETTINGS)
    path = rpq_fx.save(converted, tmp_path / "branchy.safetensors")
    with torch.device("meta"):
        skeleton = Branchy().eval()
    loaded = rpq_fx.load(skeleton, path)
    assert type(loaded) is Branchy and type(loaded.fc) is RPQLinear and not loaded.fc.weight.codebooks.is_meta
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))


def test_explicit_module_capture_round_trips_through_save_and_load(tmp_path):
    converted = rpq_fx.convert(Net().eval(), capture="module", **SETTINGS)
    path = rpq_fx.save(converted, tmp_path / "net.safetensors")
    loaded = rpq_fx.load(Net().eval(), path)
    assert type(loaded) is Net and type(loaded.fc) is RPQLinear
    assert loaded.head.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids()), converted(ids()))


def test_graph_parts_trace_rpq_layers_into_the_ops_they_compute():
    converted = rpq_fx.convert(Net().eval(), capture="module", **SETTINGS)
    parts = dict(graph_parts(converted))
    assert set(parts) == {"embed", "conv", "fc", "head"}
    assert "torch.ops.rpq_fx.linear.default" in parts["fc"].code
    assert "torch.ops.rpq_fx.embedding.default" in parts["embed"].code
    assert "torch.ops.rpq_fx.expand.default" in parts["conv"].code and "reflect" in parts["conv"].code
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert torch.equal(parts["fc"](x), converted.fc(x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out_channels=st.integers(8, 40), in_channels=st.sampled_from([4, 8, 12]), kernel=st.integers(1, 3),
       stride=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       features=st.integers(8, 70), batch=st.integers(1, 3))
def test_module_capture_matches_the_dense_reference_for_any_shape(out_channels, in_channels, kernel, stride, groups,
                                                                   bias, features, batch):
    torch.manual_seed(0)
    out_channels = out_channels * groups
    model = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups, bias=bias),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_channels, features, bias=bias)).eval()
    converted = rpq_fx.convert(model, capture="module", codebook_dim=1, num_codes=4)  # every layer shrinks
    assert type(converted[0]) is RPQConv2d and type(converted[3]) is RPQLinear
    assert converted[0].stride == (stride, stride) and converted[0].groups == groups
    reference = copy.deepcopy(model)
    reference.load_state_dict(rpq_fx.decompress(converted), strict=False)
    x = torch.randn(batch, in_channels, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-5, atol=1e-6)


def test_a_model_wrapped_for_parallel_training_is_refused(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(Net())
        with pytest.raises(rpq_fx.RPQConversionError, match="the model is wrapped for parallel training "
                                                             r"\(DistributedDataParallel\); convert the plain model"):
            rpq_fx.convert(wrapped, **SETTINGS)
        from torch.distributed.fsdp import fully_shard

        sharded = Net()
        fully_shard(sharded.fc, mesh=torch.distributed.device_mesh.init_device_mesh("cpu", (1,)))
        with pytest.raises(rpq_fx.RPQConversionError, match="'fc' is wrapped for parallel training"):
            rpq_fx.convert(sharded, capture="module", **SETTINGS)
    finally:
        dist.destroy_process_group()


def test_a_causal_lm_exports_with_plain_input_ids(check):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=300,
                                      max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 300, (2, 8))}
    converted = rpq_fx.convert(model, example_inputs=inputs, **SETTINGS)
    assert rpq_fx.conversion_record(converted).path == "torch.export"
    assert model.config.use_cache is True, "the model's config is restored after the capture"
    reference = check.dense_reference(model, converted)
    with torch.no_grad():
        check.outputs_close(converted(**inputs).logits, reference(**inputs, use_cache=False).logits)


class ReadsAWeight(nn.Module):
    """A parent reading its child layer's weight tensor in its own forward (timm's EVA attention)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96, bias=False)
        self.proj = nn.Linear(96, 64)
        self.qkv_bias = nn.Parameter(torch.randn(96))

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.qkv_bias))


def test_a_weight_read_outside_its_layer_stays_dense_under_module_capture(check):
    model = nn.Sequential(ReadsAWeight()).eval()
    converted = rpq_fx.convert(model, capture="module", **SETTINGS)
    layers = {layer.name: layer for layer in rpq_fx.conversion_record(converted).layers}
    assert "read as a tensor outside its layer's forward (by linear)" in layers["0.qkv.weight"].reason
    assert type(converted[0].qkv) is nn.Linear and type(converted[0].proj) is RPQLinear
    check.matches_dense_reference(model, converted, torch.randn(3, 32))
    assert rpq_fx.convert(model, **SETTINGS).rpq_layers[0].converted, "the fx path converts it"


TIMM = {"resnet10t": dict(), "convnext_atto": dict(), "vit_tiny_patch16_224": dict(img_size=32, depth=2)}


@pytest.mark.parametrize("name", TIMM)
def test_module_capture_keeps_timm_models_whole(check, name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10, **TIMM[name]).eval()
    converted = rpq_fx.convert(model, capture="module", max_codebook_dim=16, num_codes=16)
    assert type(converted) is type(model) and converted.pretrained_cfg == model.pretrained_cfg
    container = next(name for name, m in model.named_children() if isinstance(m, (nn.Sequential, nn.ModuleList)))
    assert len(getattr(converted, container)) == len(getattr(model, container))
    assert any(isinstance(m, RPQLinear) for m in converted.modules()) or any(
        isinstance(m, RPQConv2d) for m in converted.modules())
    x = torch.randn(2, 3, 32, 32)
    reference = check.matches_dense_reference(model, converted, x)
    with torch.no_grad():
        check.outputs_close(converted.forward_features(x), reference.forward_features(x))
    converted.reset_classifier(3)
    assert converted(x).shape == (2, 3)


class OwnsATable(nn.Module):
    """Owns a 2-D table it indexes (swin's relative position bias) beside a child layer."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(64, 4))
        self.fc = nn.Linear(32, 64)

    def forward(self, x, index: torch.Tensor | None = None):
        return self.fc(x) + self.table[torch.arange(64) % 7].sum(-1)


def test_module_capture_leaves_a_table_dense_as_fx_does_and_its_owners_children_real_layers(check):
    model = nn.Sequential(OwnsATable()).eval()
    converted = rpq_fx.convert(model, capture="module", **SETTINGS)
    layers = {layer.name: layer for layer in rpq_fx.conversion_record(converted).layers}
    assert not layers["0.table"].converted and "not the weight of a linear" in layers["0.table"].reason
    assert type(converted[0]) is OwnsATable and type(converted[0].fc) is RPQLinear
    check.matches_dense_reference(model, converted, torch.randn(3, 32))
    untraceable = rpq_fx.convert(Branchy().eval(), **SETTINGS)  # no whole trace: its parts as before
    assert isinstance(untraceable.mha, rpq_fx.RPQGraphModule)


def test_module_capture_runs_an_rnn_through_its_own_forward(check):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(32, 32, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    model = Recurrent().eval()
    converted = rpq_fx.convert(model, capture="module", **SETTINGS)
    assert isinstance(converted.rnn, rpq_fx.RPQGraphModule) and type(converted.fc) is RPQLinear
    assert {layer.name for layer in converted.rpq_layers if layer.converted} >= {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    check.matches_dense_reference(model, converted, torch.randn(2, 5, 32))


class QuotedKey(nn.Module):
    """A ModuleDict key torch.fx writes into Python source unescaped."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({'a"b': nn.Linear(32, 64)})

    def forward(self, x):
        return self.layers['a"b'](x)


def test_a_module_name_fx_cannot_write_falls_back_to_module_capture():
    model = QuotedKey().eval()
    with pytest.raises(rpq_fx.RPQConversionError, match="cannot write its forward as Python"):
        rpq_fx.convert(model, capture="fx", **SETTINGS)
    converted = rpq_fx.convert(model, **SETTINGS)
    layer = converted.layers['a"b']
    assert type(converted) is QuotedKey and type(layer) is RPQLinear
    x = torch.randn(3, 32)
    dense = rpq_fx.decompress(converted)['layers.a"b.weight']
    with torch.no_grad():
        assert torch.allclose(converted(x), F.linear(x, dense, layer.bias), atol=1e-6)
