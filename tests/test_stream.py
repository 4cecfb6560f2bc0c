"""convert_checkpoint: a meta model plus its dense safetensors checkpoint (one file or shards with an
index) gives the RPQ checkpoint ``rpq_fx.save(rpq_fx.convert(dense model))`` writes; hostile
checkpoints are refused before anything is written; a killed conversion leaves no loadable file;
peak memory grows with the largest layer, not the model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import accelerate
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rpq_fx
from rpq_fx.io import RPQCheckpointError
from rpq_fx.stream import INDEX_NAME, DenseCheckpoint, convert_checkpoint

SETTINGS = dict(num_codebooks=4, num_codes=16, seed=3, progress=False)
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def meta_llama() -> nn.Module:
    """The architecture with its parameters on meta and its computed buffers (rotary frequencies) real."""
    with accelerate.init_empty_weights():
        return LlamaForCausalLM(CONFIG).eval()


class Tied(nn.Module):
    """A traceable (torch.fx) model with a weight tied between an embedding and the output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.LayerNorm(64))
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    save_model(model, str(path))
    return model, path


def write_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> Path:
    """``state`` as a Hugging Face sharded checkpoint: ``shards`` files and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name].contiguous() for name in names[i::shards]}
        save_file(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def saved(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint's rpq_fx metadata (parsed) and tensors: safetensors writes its metadata map in no fixed
    order, so two saves of one model differ in bytes, never in these."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["rpq_fx"]), {name: f.get_tensor(name) for name in f.keys()}


def assert_same_file(got: Path, expected: Path) -> None:
    (info_a, tensors_a), (info_b, tensors_b) = saved(got), saved(expected)
    assert info_a == info_b
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:
        assert torch.equal(tensors_a[name], tensors_b[name]), name


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_llama_file_equals_convert_of_the_loaded_model(llama, tmp_path, init):
    dense, path = llama
    expected = rpq_fx.save(rpq_fx.convert(dense, init=init, **SETTINGS), tmp_path / "expected.safetensors")
    model = meta_llama()
    out = convert_checkpoint(model, path, tmp_path / "out.safetensors", init=init, **SETTINGS)
    assert_same_file(out, expected)
    assert all(p.is_meta for p in model.parameters())  # the user's model is untouched
    loaded = rpq_fx.load(meta_llama(), out)
    x = torch.randint(0, 256, (2, 9))
    reference = LlamaForCausalLM(CONFIG).eval()  # an independent dense model with the decompressed weights
    reference.load_state_dict({**dense.state_dict(), **rpq_fx.decompress(loaded)})
    torch.testing.assert_close(loaded(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_sharded_folder_with_tied_weight(tmp_path):
    torch.manual_seed(1)
    dense = Tied().eval()
    state = {k: v for k, v in dense.state_dict().items() if k != "head.weight"}  # a tied weight stored once
    folder = write_shards(state, tmp_path / "shards", 3)
    settings = dict(SETTINGS, codebook_dim=8, num_codebooks=None, init="kmeans")
    expected = rpq_fx.save(rpq_fx.convert(dense, **settings), tmp_path / "expected.safetensors")
    with torch.device("meta"):
        model = Tied().eval()
    out = convert_checkpoint(model, folder, tmp_path / "out.safetensors", **settings)
    assert_same_file(out, expected)
    with torch.device("meta"):
        loaded = rpq_fx.load(Tied().eval(), out)
    x = torch.randint(0, 512, (3, 5))
    torch.testing.assert_close(loaded(x), rpq_fx.convert(dense, **settings)(x), rtol=0, atol=0)


def test_config_overrides_mix_random_and_kmeans(llama, tmp_path):
    dense, path = llama
    config = rpq_fx.RPQConfig(num_codebooks=4, num_codes=16, init="kmeans", seed=5,
                              overrides={"*.mlp.*": {"init": "random"}, "lm_head": {"skip": True}})
    expected = rpq_fx.save(rpq_fx.convert(dense, config=config, progress=False), tmp_path / "expected.safetensors")
    out = convert_checkpoint(meta_llama(), path, tmp_path / "out.safetensors", config=config, progress=False)
    assert_same_file(out, expected)
    record = rpq_fx.conversion_record(rpq_fx.load(meta_llama(), out))
    assert record.fits["model.layers.0.mlp.up_proj.weight"].filled == "random"
    assert record.fits["model.layers.0.self_attn.q_proj.weight"].filled == "kmeans"


@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]))
@settings(max_examples=20, deadline=None)
def test_dense_checkpoint_reads_each_tensor_as_written(tmp_path_factory, shapes, dtype):
    folder = tmp_path_factory.mktemp("dense")
    state = {f"t{i}": (torch.rand(shape) * 100).to(dtype) for i, shape in enumerate(shapes)}
    single = folder / "one.safetensors"
    save_file(state, single)
    for checkpoint in (DenseCheckpoint(single), DenseCheckpoint(write_shards(state, folder / "sharded", 2))):
        assert set(checkpoint.entries) == set(state)
        for name, tensor in state.items():
            assert torch.equal(checkpoint.read(name), tensor)


def _hostile(tmp_path: Path, dense: nn.Module) -> dict[str, tuple[Path, str]]:
    """Checkpoints that must be refused, and a phrase of each refusal."""
    state = dense.state_dict()
    cases = {}

    def folder(name: str, mutate) -> Path:
        path = write_shards(state, tmp_path / name, 2)
        mutate(path)
        return path

    def index_edit(edit):
        def mutate(path):
            index = json.loads((path / INDEX_NAME).read_text())
            edit(index["weight_map"])
            (path / INDEX_NAME).write_text(json.dumps(index))
        return mutate

    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, outside)
    escape = index_edit(lambda m: m.update({"lm_head.weight": "../outside.safetensors"}))
    cases["traversal"] = folder("traversal", escape), "must be a file name"
    cases["unmapped"] = folder("unmapped", index_edit(lambda m: m.pop("lm_head.weight"))), "not mapped to it"
    cases["no shard"] = folder("no_shard", index_edit(lambda m: m.update({"lm_head.weight": "gone.safetensors"}))), \
        "not in"
    cases["index not json"] = folder("bad_json", lambda p: (p / INDEX_NAME).write_text("{]")), "damaged index"
    cases["no weight_map"] = folder("no_map", lambda p: (p / INDEX_NAME).write_text("[1]")), "damaged index"

    def truncate(path):
        shard = next(path.glob("model-00001*"))
        shard.write_bytes(shard.read_bytes()[:-7])
    cases["truncated"] = folder("truncated", truncate), "truncated"
    for name, change, phrase in (("shape", lambda s: s.update({"lm_head.weight": torch.zeros(256, 32)}), "[256, 32]"),
                                 ("dtype", lambda s: s.update({"lm_head.weight": s["lm_head.weight"].half()}),
                                  "float16"),
                                 ("unexpected", lambda s: s.update({"extra.weight": torch.zeros(2)}), "does not have"),
                                 ("missing", lambda s: s.pop("lm_head.weight"), "missing")):
        changed = dict(state)
        change(changed)
        path = tmp_path / f"{name}.safetensors"
        save_file(changed, path)
        cases[name] = path, phrase
    return cases


def test_hostile_checkpoints_are_refused_before_writing(llama, tmp_path):
    dense, _ = llama
    for case, (path, phrase) in _hostile(tmp_path, dense).items():
        model = meta_llama()
        out = tmp_path / f"out-{case}.safetensors"
        with pytest.raises((RPQCheckpointError, FileNotFoundError), match=None) as error:
            convert_checkpoint(model, path, out, **SETTINGS)
        assert phrase in str(error.value), (case, str(error.value))
        assert not out.exists() and not list(tmp_path.glob(f".out-{case}*")), case
        assert all(p.is_meta for p in model.parameters())


def test_bad_models_get_clear_errors(llama, tmp_path):
    dense, path = llama
    with pytest.raises(ValueError, match="meta device.*'model.embed_tokens.weight' holds values"):
        convert_checkpoint(dense, path, tmp_path / "a.safetensors", **SETTINGS)
    with torch.device("meta"):  # every buffer on meta too: the rotary frequencies are in no checkpoint
        model = LlamaForCausalLM(CONFIG)
    with pytest.raises(rpq_fx.RPQConversionError, match="rotary_emb.inv_freq' is on the meta device"):
        convert_checkpoint(model, path, tmp_path / "b.safetensors", **SETTINGS)
    with pytest.raises(FileNotFoundError, match="neither"):
        convert_checkpoint(meta_llama(), tmp_path, tmp_path / "c.safetensors", **SETTINGS)
    assert not list(tmp_path.iterdir())


_KILLED = """
import sys, time, torch, accelerate
from transformers import LlamaConfig, LlamaForCausalLM
import rpq_fx.stream as stream
import rpq_fx.io as io
config = LlamaConfig(**{config})
with accelerate.init_empty_weights():
    model = LlamaForCausalLM(config).eval()
where = sys.argv[1]

def stall(*args, **kwargs):
    open(sys.argv[3], "w").close()  # tell the test we are half-way
    time.sleep(600)

if where == "fit":  # in the middle of the fits
    fit = stream.fit_weights
    calls = []
    def slow(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            stall()
        return fit(*args, **kwargs)
    stream.fit_weights = slow
else:  # in the middle of writing the file
    write = io.save_file
    def half(tensors, path, metadata):
        write(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        stall()
    io.save_file = half
stream.convert_checkpoint(model, sys.argv[2], sys.argv[4], num_codebooks=4, num_codes=16, init="kmeans",
                          progress=False)
"""


@pytest.mark.parametrize("where", ["fit", "write"])
def test_killed_conversion_leaves_no_loadable_file(llama, tmp_path, where):
    _, path = llama
    script = tmp_path / "convert.py"
    script.write_text(_KILLED.replace("{config}", repr(CONFIG.to_diff_dict())))
    out, marker = tmp_path / "out.safetensors", tmp_path / "half-way"
    out.write_bytes(b"an older file the user keeps")
    process = subprocess.Popen([sys.executable, str(script), where, str(path), str(marker), str(out)],
                               env={**os.environ, "RPQ_FX_KERNELS": "torch"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the conversion ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert out.read_bytes() == b"an older file the user keeps"
    partial = list(tmp_path.glob(".out.safetensors.tmp-*"))
    assert len(partial) == (where == "write")
    for file in partial:
        with pytest.raises(RPQCheckpointError):
            rpq_fx.load(meta_llama(), file)


_PEAK = """
import sys, torch
from torch import nn
from safetensors.torch import save_file
from rpq_fx.stream import convert_checkpoint

def resident(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def run(checkpoint, out, layers):
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(layers)]).eval()
    convert_checkpoint(model, checkpoint, out, num_codebooks=1, num_codes=4, init="kmeans", progress=False)

folder = sys.argv[1]
save_file({"0.weight": torch.randn(1024, 1024)}, f"{folder}/one.safetensors")
run(f"{folder}/one.safetensors", f"{folder}/one-out.safetensors", 1)  # one-time costs: thread pools, kernels
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from the resident size
before = resident("VmRSS")
run(f"{folder}/model.safetensors", f"{folder}/out.safetensors", int(sys.argv[2]))
print(resident("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_grows_with_the_largest_layer_not_the_model(tmp_path):
    layers, layer_bytes = 24, 1024 * 1024 * 4
    save_file({f"{i}.weight": torch.randn(1024, 1024) for i in range(layers)}, tmp_path / "model.safetensors")
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    # reason: glibc raises its mmap threshold as big blocks are freed, then keeps freed layers in its heap (peaks
    # of 21 to 42 MB, whatever the layer count); a fixed threshold returns each freed layer, so the peak is the work
    env = {**os.environ, "RPQ_FX_KERNELS": "torch", "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(layers)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = int(result.stdout.split()[-1])
    # the fit's work space is a few times its layer (measured: 21 MB, 5 layers, for 8 layers as for 24)
    assert growth < 8 * layer_bytes, f"peak grew {growth / 2**20:.1f} MiB; the model is {layers} layers"
    assert rpq_fx.load(nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(layers)]).eval().to("meta"),
                       tmp_path / "out.safetensors") is not None
