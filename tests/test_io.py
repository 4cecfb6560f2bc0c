"""save / load / save_dense: safetensors RPQ checkpoints, round trips, and every way a file can be wrong."""

import copy
import json
import pickle

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rpq_fx
from rpq_fx import RPQCheckpointError, RPQConfig
from rpq_fx.config import without_new_defaults
from rpq_fx.nn import RPQWeight

MIB = 1024**2


def converted_lenet(zoo, **kwargs):
    kwargs = kwargs or {"num_codebooks": 5, "num_codes": 16}
    return rpq_fx.convert(zoo.LeNet().eval(), **kwargs)


def outputs_equal(a: nn.Module, b: nn.Module, *inputs) -> None:
    with torch.no_grad():
        ya, yb = a(*inputs), b(*inputs)
    assert torch.equal(ya, yb), f"max |diff| = {(ya - yb).abs().max().item():g}"


def outputs_close(converted: nn.Module, dense: nn.Module, *inputs) -> None:
    """A dense model vs the converted one: equal to float rounding (a converted linear may compute in the
    compressed domain, summing in another order)."""
    with torch.no_grad():
        actual, expected = converted(*inputs), dense(*inputs)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def tensor_bytes(model: nn.Module) -> int:
    return round(rpq_fx.model_size(model) * MIB)


# ---------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_is_bit_identical_and_about_model_size(zoo, tmp_path):
    gm = converted_lenet(zoo)
    assert rpq_fx.report(gm).totals["converted"] == 3  # fc2 (10 rows) would grow: it stays dense
    path = rpq_fx.save(gm, tmp_path / "lenet.safetensors")
    size = path.stat().st_size
    assert tensor_bytes(gm) < size < tensor_bytes(gm) + 24 * 1024, "file should be the tensors plus a small header"
    loaded = rpq_fx.load(zoo.LeNet().eval(), path)
    assert isinstance(loaded.fc1.weight, RPQWeight)
    assert loaded.fc1.weight.codes.dtype == torch.uint8
    outputs_equal(gm, loaded, torch.randn(3, 1, 28, 28))
    assert loaded.rpq_config == gm.rpq_config
    assert [layer.name for layer in loaded.rpq_layers] == [layer.name for layer in gm.rpq_layers]
    assert [p.name for p in tmp_path.iterdir()] == ["lenet.safetensors"], "no temporary file left behind"


def test_file_is_plain_safetensors_with_readable_metadata(zoo, tmp_path):
    gm = converted_lenet(zoo)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors", spec="module:factory")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("fc1.weight.codes").dtype == torch.uint8
    assert metadata["format"] == "rpq_fx" and metadata["format_version"] == "2"
    info = json.loads(metadata["rpq_fx"])
    assert info["config"] == without_new_defaults(gm.rpq_config.to_dict())  # as files before additive_codebooks
    assert info["spec"] == "module:factory"
    assert {"conv1.weight.codebooks", "conv1.weight.codes", "conv1.bias", "fc2.bias"} <= keys
    assert "fc2.weight" in keys and not {"conv1.weight", "conv2.weight", "fc1.weight"} & keys, \
        "a converted layer's dense weight is not in the file"
    assert {r["name"] for r in info["layers"] if r["reason"] is None} == {"conv1.weight", "conv2.weight",
                                                                           "fc1.weight"}
    assert ["fc1.weight", [500, 800], "float32", "param"] in info["architecture"]["tensors"]
    assert rpq_fx.checkpoint_info(path)["file_bytes"] == path.stat().st_size


def test_load_path_never_unpickles(zoo, tmp_path, monkeypatch):
    gm = converted_lenet(zoo)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = rpq_fx.load(zoo.LeNet().eval(), path)
    outputs_equal(gm, loaded, torch.randn(2, 1, 28, 28))


class _LargestAllocation(TorchDispatchMode):
    """The largest storage (bytes) of any real (non-meta) tensor an op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_load_onto_meta_model_allocates_nothing_dense_and_keeps_the_tie(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), num_codebooks=2)
    path = rpq_fx.save(gm, tmp_path / "tied.safetensors")
    with torch.device("meta"):
        skeleton = zoo.TiedLM(vocab=4000).eval()
    with _LargestAllocation() as watch:
        loaded = rpq_fx.load(skeleton, path)
    dense = 4000 * 64 * 4
    assert 0 < watch.largest <= 2 * 256 * 32 * 4 < dense / 8, f"a {watch.largest}-byte tensor during load"
    assert loaded.emb.weight is loaded.lm_head.weight, "the tied weight must stay one RPQ weight"
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert skeleton.emb.weight.is_meta, "the skeleton itself is not modified"
    assert tensor_bytes(loaded) == tensor_bytes(gm)
    outputs_equal(gm, loaded, torch.randint(0, 4000, (2, 9)))


def test_trained_model_round_trips_and_loaded_model_trains(zoo, tmp_path):
    gm = converted_lenet(zoo).train()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    x, target = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.nll_loss(gm(x), target).backward()
    optimizer.step()
    path = rpq_fx.save(gm, tmp_path / "trained.safetensors")
    loaded = rpq_fx.load(zoo.LeNet(), path)
    outputs_equal(gm.eval(), loaded.eval(), x)
    loaded.train()
    codebooks = loaded.fc1.weight.codebooks
    assert isinstance(codebooks, nn.Parameter) and codebooks.requires_grad
    before = codebooks.detach().clone()
    F.nll_loss(loaded(x), target).backward()
    torch.optim.SGD(loaded.parameters(), lr=0.1).step()
    assert not torch.equal(before, codebooks.detach())
    again = rpq_fx.load(zoo.LeNet(), path)  # training the loaded model did not write into the file
    assert torch.equal(again.fc1.weight.codebooks, before)


def test_overrides_shared_codebooks_and_filter_fn_round_trip(zoo, tmp_path):
    config = RPQConfig(num_codebooks=5, num_codes=16, overrides={"fc2": {"skip": True}, "conv2": {
        "codebook_dim": 10, "shared_codebooks": True}})
    gm = rpq_fx.convert(zoo.LeNet().eval(), config=config, filter_fn=lambda layer, name: name != "conv1")
    record = {layer.name: layer for layer in gm.rpq_layers}
    assert record["conv1.weight"].reason == "excluded by filter_fn"
    assert record["fc2.weight"].reason == "skipped by a config override"
    assert gm.conv2.weight.codebooks.shape == (1, 16, 10)
    path = rpq_fx.save(gm, tmp_path / "mixed.safetensors")
    loaded = rpq_fx.load(zoo.LeNet().eval(), path)
    assert {layer.name: layer.reason for layer in loaded.rpq_layers} == {n: p.reason for n, p in record.items()}
    assert loaded.rpq_config == config
    outputs_equal(gm, loaded, torch.randn(2, 1, 28, 28))


def test_int16_codes_round_trip(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), num_codebooks=2, num_codes=1024)
    assert gm.emb.weight.codes.dtype == torch.int16 and int(gm.emb.weight.codes.max()) > 255
    path = rpq_fx.save(gm, tmp_path / "int16.safetensors")
    assert rpq_fx.checkpoint_info(path)["tensors"]["emb.weight.codes"]["dtype"] == "I16"
    loaded = rpq_fx.load(zoo.TiedLM(vocab=4000).eval(), path)
    assert torch.equal(loaded.emb.weight.codes, gm.emb.weight.codes)
    outputs_equal(gm, loaded, torch.randint(0, 4000, (2, 6)))


class Branchy(nn.Module):
    """Traces differently in train and eval mode (fx bakes ``self.training`` in)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 512)
        self.out = nn.Linear(512, 300)

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * 0.5
        return self.out(torch.relu(h))


def test_train_and_eval_graphs_and_checkpoint_round_trip(tmp_path):
    gm = rpq_fx.convert(Branchy(), codebook_dim=16, checkpoint=True)
    path = rpq_fx.save(gm, tmp_path / "branchy.safetensors")
    assert set(rpq_fx.checkpoint_info(path)["code"]) == {"train", "eval"}
    loaded = rpq_fx.load(Branchy(), path)
    x = torch.randn(4, 64)
    outputs_equal(gm.train(), loaded.train(), x)
    outputs_equal(gm.eval(), loaded.eval(), x)
    assert loaded.rpq_config.checkpoint


def test_checkpoint_report_needs_no_model(zoo, tmp_path):
    gm = converted_lenet(zoo, num_codebooks=5)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors")
    saved, live = rpq_fx.checkpoint_report(path), rpq_fx.report(gm)
    assert saved.rows == live.rows
    assert saved.totals == live.totals


def test_save_refuses_what_it_cannot_save(zoo, tmp_path):
    with pytest.raises(TypeError, match="rpq_fx.convert"):
        rpq_fx.save(zoo.LeNet(), tmp_path / "dense.safetensors")
    with torch.device("meta"):
        skeleton = zoo.LeNet()
    with pytest.raises(ValueError, match="meta device"):
        rpq_fx.save(rpq_fx.convert(skeleton, num_codebooks=5), tmp_path / "meta.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# save_dense


def test_save_dense_loads_into_the_original_architecture(zoo, tmp_path):
    gm = converted_lenet(zoo)
    path = rpq_fx.save_dense(gm, tmp_path / "dense.safetensors")
    state = safetensors.torch.load_file(path)
    assert state["fc1.weight"].shape == (500, 800) and "fc1.weight.codes" not in state
    dense = zoo.LeNet().eval()
    assert set(state) == set(dense.state_dict())
    dense.load_state_dict(state)
    outputs_close(gm, dense, torch.randn(2, 1, 28, 28))
    with pytest.raises(RPQCheckpointError, match="dense checkpoint"):
        rpq_fx.load(zoo.LeNet(), path)


def test_save_dense_stores_a_tied_weight_once(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), num_codebooks=2)
    path = rpq_fx.save_dense(gm, tmp_path / "dense.safetensors")
    dense = zoo.TiedLM(vocab=4000).eval()
    missing, unexpected = safetensors.torch.load_model(dense, path)
    assert not unexpected
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["tied"]) == {"lm_head.weight": "emb.weight"}
    outputs_close(gm, dense, torch.randint(0, 4000, (2, 5)))


# ---------------------------------------------------------------------------------------------------
# files that must not load


class WiderLeNet(nn.Module):
    """LeNet's names, but fc1 has 600 outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(800, 600)
        self.fc2 = nn.Linear(600, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _rewrite(path, tensors=None, **metadata):
    """Write ``path`` again with some metadata entries replaced (a stand-in for another writer)."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata)
    safetensors.torch.save_file(tensors or data, path, meta)


def _damage(path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    if how == "truncated":
        path.write_bytes(raw[: len(raw) - 100])
    elif how == "appended":
        path.write_bytes(raw + b"\0" * 16)
    elif how == "tensor byte":
        raw[header + (len(raw) - header) // 2] ^= 0x55
        path.write_bytes(raw)
    elif how == "metadata":
        text = raw[8:header].decode()
        assert '\\"seed\\":0' in text
        path.write_bytes(raw[:8] + text.replace('\\"seed\\":0', '\\"seed\\":7').encode() + raw[header:])
    elif how == "header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "newer version":
        _rewrite(path, format_version="3")
    elif how == "not rpq":
        _rewrite(path, format="something-else")


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"),
    ("appended", "unexpected bytes"),
    ("tensor byte", "does not match its checksum"),
    ("metadata", "metadata does not match its checksum"),
    ("header", "damaged safetensors header"),
    ("empty", "too short"),
    ("newer version", "format version 3.*upgrade rpq_fx"),
    ("not rpq", "not an rpq_fx checkpoint"),
])
def test_damaged_or_foreign_file_is_refused_and_nothing_is_loaded(zoo, tmp_path, check, how, message):
    gm = converted_lenet(zoo)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors")
    _damage(path, how)
    model = zoo.LeNet()
    before = check.snapshot(model)
    with pytest.raises(RPQCheckpointError, match=message):
        rpq_fx.load(model, path)
    check.unchanged(model, before)


def test_plain_state_dict_file_is_not_an_rpq_checkpoint(zoo, tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(zoo.LeNet().state_dict(), path)
    with pytest.raises(RPQCheckpointError, match="not an rpq_fx checkpoint"):
        rpq_fx.load(zoo.LeNet(), path)
    with pytest.raises(FileNotFoundError):
        rpq_fx.load(zoo.LeNet(), tmp_path / "missing.safetensors")


def test_file_from_another_architecture_is_refused(zoo, tmp_path):
    path = rpq_fx.save(converted_lenet(zoo), tmp_path / "lenet.safetensors")
    with torch.device("meta"):
        other = zoo.TiedLM()
    with pytest.raises(RPQCheckpointError, match=r"another architecture \(LeNet.*than this TiedLM.*conv1.weight"):
        rpq_fx.load(other, path)
    assert other.emb.weight.is_meta
    with pytest.raises(RPQCheckpointError, match=r"fc1.weight \(saved \[500, 800\] float32, here \[600, 800\]"):
        rpq_fx.load(WiderLeNet(), path)


def test_same_tensors_but_another_forward_is_refused(zoo, tmp_path):
    class TanhLeNet(zoo.LeNet):
        def forward(self, x):
            x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 2)
            x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
            return F.log_softmax(self.fc2(F.relu(self.fc1(x.view(-1, 800)))), dim=1)

    path = rpq_fx.save(converted_lenet(zoo), tmp_path / "lenet.safetensors")
    with pytest.raises(RPQCheckpointError, match="computes something else.*tanh"):
        rpq_fx.load(TanhLeNet().eval(), path)
    loaded = rpq_fx.load(TanhLeNet().eval(), path, check_forward=False)
    assert isinstance(loaded.fc1.weight, RPQWeight)


def test_config_that_converts_differently_is_refused(zoo, tmp_path):
    gm = converted_lenet(zoo)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors")
    # another rpq_fx that split the same config differently: simulated by a record that says so
    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["rpq_fx"])
    for record in info["layers"]:
        if record["name"] == "fc1.weight":
            record["num_codebooks"], record["codebook_dim"] = 10, 80
    text = json.dumps(info, sort_keys=True, separators=(",", ":"))
    import hashlib

    _rewrite(path, rpq_fx=text, rpq_fx_sha256=hashlib.sha256(text.encode()).hexdigest())
    with pytest.raises(RPQCheckpointError, match=r"different result for 'fc1.weight' \(codebook_dim: saved 80, here 160"):
        rpq_fx.load(zoo.LeNet(), path)


def test_loaded_model_is_independent_of_the_original(zoo, tmp_path):
    gm = converted_lenet(zoo)
    path = rpq_fx.save(gm, tmp_path / "m.safetensors")
    original = zoo.LeNet()
    loaded = rpq_fx.load(original, path)
    assert loaded.fc2.bias.data_ptr() != original.fc2.bias.data_ptr()
    assert torch.equal(loaded.fc2.bias, gm.fc2.bias)
    copy.deepcopy(loaded)  # a loaded model is an ordinary converted model


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace the whole model, only its layers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 512)
        self.head = nn.Linear(512, 300)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:
            h = -h
        return self.head(h)


def test_model_converted_in_place_round_trips_onto_meta(tmp_path):
    try:
        converted = rpq_fx.convert(Untraceable().eval(), codebook_dim=16)
    except rpq_fx.RPQConversionError:
        pytest.skip("this rpq_fx cannot convert an untraceable model in place")
    assert type(converted) is Untraceable, "converted in place: the model object's class is kept"
    path = rpq_fx.save(converted, tmp_path / "inplace.safetensors")
    assert set(rpq_fx.checkpoint_info(path)["code"]) == {"fc:eval", "head:eval"}
    with torch.device("meta"):
        skeleton = Untraceable().eval()
    loaded = rpq_fx.load(skeleton, path)
    assert type(loaded) is Untraceable and isinstance(loaded.fc.weight, RPQWeight)
    for x in (torch.randn(3, 64), -torch.randn(3, 64)):
        outputs_equal(converted, loaded, x)
    dense = rpq_fx.save_dense(converted, tmp_path / "dense.safetensors")
    reference = Untraceable().eval()
    reference.load_state_dict(safetensors.torch.load_file(dense))
    outputs_close(converted, reference, torch.randn(3, 64))


def test_torch_export_capture_round_trips_with_its_example_inputs(zoo, tmp_path):
    import inspect

    if "example_inputs" not in inspect.signature(rpq_fx.convert).parameters:
        pytest.skip("this rpq_fx has no torch.export capture")
    x = torch.randn(2, 1, 28, 28)
    converted = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5, example_inputs=(x,))
    path = rpq_fx.save(converted, tmp_path / "exported.safetensors")
    with pytest.raises(RPQCheckpointError, match="pass example_inputs="):
        rpq_fx.load(zoo.LeNet().eval(), path)
    with torch.device("meta"):
        skeleton = zoo.LeNet().eval()
    loaded = rpq_fx.load(skeleton, path, example_inputs=(torch.empty(2, 1, 28, 28, device="meta"),))
    outputs_equal(converted, loaded, x)
