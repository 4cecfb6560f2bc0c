"""Hostile and damaged checkpoints (issue 19): checks that hold without trusting the checksums, no
code run from a file, honest errors for odd paths, a forward check independent of mode and of fx's
printing, and files that only ever land inside --out."""

import hashlib
import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open

import rpq_fx
from rpq_fx import RPQCheckpointError, cli
from test_io_format1 import FIXTURE, IN_PLACE_FIXTURE, Format1InPlace, Format1Net, assert_saved_outputs


def craft(path: Path, source: Path = FIXTURE, tensors: dict | None = None, edit=None, **metadata) -> Path:
    """``source`` rewritten as an attacker would: tensors replaced, the rpq_fx JSON edited by ``edit``,
    every checksum recomputed so that only the new checks can catch it."""
    with safe_open(source, framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    info = json.loads(meta["rpq_fx"])
    if edit is not None:
        edit(info)
    info["sha256"] = {k: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                      for k, t in data.items()}
    text = json.dumps(info, sort_keys=True, separators=(",", ":"))
    meta.update(rpq_fx=text, rpq_fx_sha256=hashlib.sha256(text.encode()).hexdigest())
    meta.update(metadata)
    safetensors.torch.save_file(data, path, meta)
    return path


def raw_file(path: Path, header: dict | str, data: bytes = b"") -> Path:
    """A file with the given safetensors header (a dict or raw JSON text) and data bytes."""
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


# ---------------------------------------------------------------------------------------------------
# codes and indices (item 1)


@pytest.mark.parametrize("value, message", [
    (torch.full((8, 64), 255, dtype=torch.uint8), r"fc1.weight.codes: code 255 is out of range for 16 codewords"),
    (torch.full((8, 64), 16, dtype=torch.uint8), r"fc1.weight.codes: code 16 is out of range for 16 codewords"),
])
def test_codes_out_of_range_with_recomputed_checksums_are_refused(tmp_path, check, value, message):
    path = craft(tmp_path / "m.safetensors", tensors={"fc1.weight.codes": value})
    model = Format1Net()
    before = check.snapshot(model)
    with pytest.raises(RPQCheckpointError, match=message):
        rpq_fx.load(model, path)
    check.unchanged(model, before)


def test_codes_of_another_dtype_are_refused_before_anything_is_read(tmp_path):
    path = craft(tmp_path / "m.safetensors", tensors={"fc1.weight.codes": torch.zeros(8, 64, dtype=torch.int64)})
    with pytest.raises(RPQCheckpointError, match=r"'fc1.weight.codes' is \[8, 64\] int64 in the file, \[8, 64\] uint8"):
        rpq_fx.load(Format1Net(), path)


# ---------------------------------------------------------------------------------------------------
# crafted metadata and headers (item 3): RPQCheckpointError, never another exception


def _edit(key, value):
    def edit(info):
        target, *path = key.split(".")
        node = info
        for part in [target, *path][:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = [target, *path][-1]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


@pytest.mark.parametrize("key, value, message", [
    ("layers", "x", r"'layers' must be a list"),
    ("layers.0", "x", r"layers\[0\] must be an object"),
    ("layers.0.shape", [-3, 3], r"layers\[0\].shape must be a non-empty list of ints >= 1, got \[-3, 3\]"),
    ("layers.2.shape", [0, 3], r"layers\[2\].shape must be a non-empty list of ints >= 1, got \[0, 3\]"),
    ("layers.0.hot_rows", 1, r"layers\[0\].hot_codebook_dim \(a weight with hot rows\) must be an int"),
    ("layers.0.num_codes", 10**9, r"layers\[0\].num_codes must be null or an int in \[2, 65536\]"),
    ("layers.0.num_codebooks", None, r"layers\[0\].num_codebooks \(a converted weight\) must be an int"),
    ("layers.0.dtype", "__class__", r"layers\[0\].dtype must be a torch dtype name"),
    ("layers.0.aliases", "conv.weight", r"layers\[0\].aliases must be a non-empty list"),
    ("architecture", "x", r"'architecture' must be an object"),
    ("architecture.tensors.0", ["conv.bias", [-1], "float32", "param"], r"architecture.tensors\[0\] must be"),
    ("code", {"eval": 3}, r"'code' must be an object of strings"),
    ("config", [1, 2], r"'config' must be an object"),
    ("spec", {"a": 1}, r"'spec' must be null or a string"),
])
def test_crafted_metadata_is_a_checkpoint_error_everywhere(tmp_path, key, value, message):
    path = craft(tmp_path / "m.safetensors", edit=_edit(key, value))
    for read in (rpq_fx.checkpoint_info, rpq_fx.checkpoint_report, lambda p: rpq_fx.load(Format1Net(), p)):
        with pytest.raises(RPQCheckpointError, match=message):
            read(path)


def test_deeply_nested_json_is_a_checkpoint_error(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    text = deep
    path = craft(tmp_path / "m.safetensors", rpq_fx=text, rpq_fx_sha256=hashlib.sha256(text.encode()).hexdigest())
    with pytest.raises(RPQCheckpointError, match="damaged rpq_fx metadata"):
        rpq_fx.checkpoint_info(path)
    path = raw_file(tmp_path / "h.safetensors", '{"a":' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(RPQCheckpointError, match="damaged safetensors header"):
        rpq_fx.checkpoint_info(path)


@pytest.mark.parametrize("depth", [20, 500, 800])
def test_nesting_below_the_parsers_limit_is_refused_before_a_reader_recurses_on_it(capsys, tmp_path, depth):
    def edit(info):
        info["config"]["overrides"] = {"x": json.loads("[" * depth + "]" * depth)}

    path = craft(tmp_path / "m.safetensors", edit=edit)
    refused = r"rpq_fx metadata (nests \d+ deep \(at most 16 accepted\)|\(RecursionError)"  # by us or the parser
    with pytest.raises(RPQCheckpointError, match=refused):
        rpq_fx.checkpoint_info(path)
    code, _, stderr = run(capsys, "inspect", path, "--out", tmp_path / "out", "--quiet")
    assert code == 1 and re.search(refused, stderr)


@pytest.mark.parametrize("header, message", [
    ({"__metadata__": "x"}, r"__metadata__ must be an object of strings"),
    ({"__metadata__": {"format": 3}}, r"__metadata__ must be an object of strings"),
    ({"t": "x"}, r"tensor 't' must be an object"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, r"tensor 't' shape must be a list of ints"),
    ({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, r"tensor 't' dtype must be one of"),
    ({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, r"data_offsets must be 4835703278458516698824704 bytes apart"),
    ({"t": {"dtype": "F32", "shape": [0, 2**60], "data_offsets": [0, 0]}}, r"shape must be of a plausible size"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, r"tensor data has a gap at byte 0"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "u": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, r"tensor data overlap"),
    ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [2, 1]}}, r"data_offsets must be \[begin, end\]"),
])
def test_crafted_safetensors_header_is_a_checkpoint_error(tmp_path, header, message):
    path = raw_file(tmp_path / "m.safetensors", header, b"\0" * 8)
    for read in (rpq_fx.checkpoint_info, rpq_fx.checkpoint_report, lambda p: rpq_fx.load(Format1Net(), p)):
        with pytest.raises(RPQCheckpointError, match=message):
            read(path)


def test_directory_and_device_are_named_for_what_they_are(tmp_path):
    with pytest.raises(RPQCheckpointError, match="is a directory, not a checkpoint file"):
        rpq_fx.load(Format1Net(), tmp_path)
    if Path("/dev/zero").exists():
        with pytest.raises(RPQCheckpointError, match="not a regular file"):
            rpq_fx.checkpoint_info("/dev/zero")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        rpq_fx.checkpoint_info(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------
# the forward check (item 4, issue 20 item 5)


class TanhNet(Format1Net):
    def forward(self, x):
        x = torch.tanh(self.conv(x)).mean((2, 3))
        if self.training:
            x = x * 0.5
        return self.fc2(F.relu(self.fc1(x)))


class TrainOnlyDifferent(Format1Net):
    """Eval forward as saved; in train mode it scales by 2 instead of 0.5."""

    def forward(self, x):
        x = F.relu(self.conv(x)).mean((2, 3))
        if self.training:
            x = x * 2.0
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("skeleton", [TanhNet, TrainOnlyDifferent])
@pytest.mark.parametrize("train", [True, False])
def test_another_forward_is_refused_in_either_mode(skeleton, train):
    with pytest.raises(RPQCheckpointError, match="computes something else"):
        rpq_fx.load(skeleton().train(train), FIXTURE)


class OneGraph(torch.nn.Module):
    """Traces alike in train and eval mode: the file holds one graph, saved under the mode it was in."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 300)

    def forward(self, x):
        return F.relu(self.fc(x))


class OneGraphTanh(OneGraph):
    def forward(self, x):
        return torch.tanh(self.fc(x))


@pytest.mark.parametrize("train", [True, False])
def test_one_graph_file_is_checked_whatever_the_skeletons_mode(tmp_path, train):
    path = rpq_fx.save(rpq_fx.convert(OneGraph().eval(), codebook_dim=4), tmp_path / "m.safetensors")
    assert set(rpq_fx.checkpoint_info(path)["code"]) == {"eval"}
    rpq_fx.load(OneGraph().train(train), path)
    with pytest.raises(RPQCheckpointError, match=r"computes something else.*saved `torch.nn.functional.relu\(%0.*here `torch.tanh\(%0\)`"):
        rpq_fx.load(OneGraphTanh().train(train), path)


def test_in_place_parts_are_checked_in_either_mode():
    """Saved in eval mode; each layer's graph is alike in both modes, so a train-mode skeleton loads. (A
    model converted in place keeps its own forward untraced: only its layers' graphs can be compared.)"""
    loaded = rpq_fx.load(Format1InPlace().train(), IN_PLACE_FIXTURE)
    assert loaded.training


def _reprinted(code: str) -> str:
    """``code`` as another torch's fx might print it: other local names, comments, one statement a line."""
    names = sorted(set(re.findall(r"^    (\w+) = ", code, re.M)) - {"x"}, key=len, reverse=True)
    for i, name in enumerate(names):
        code = re.sub(rf"(?<![.\w]){name}\b", f"v{i}", code)
    code = code.replace(";  ", "\n    ").replace("inplace = False", "inplace=False")
    return code.replace("def forward(self, x):", "def forward(self, x):\n    # File: model.py, line 1")


def test_forward_printed_differently_still_loads(tmp_path):
    def edit(info):
        info["code"] = {mode: _reprinted(code) for mode, code in info["code"].items()}

    path = craft(tmp_path / "m.safetensors", edit=edit)
    assert rpq_fx.checkpoint_info(path)["code"] != rpq_fx.checkpoint_info(FIXTURE)["code"]
    assert_saved_outputs(rpq_fx.load(Format1Net().train(), path))


# ---------------------------------------------------------------------------------------------------
# the CLI: no code run from the file, names sanitised (item 2, low items)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec", ["helpers:build", "os:abort", "helpers.py:build"])
def test_inspect_and_report_never_run_the_spec_in_the_file(capsys, tmp_path, monkeypatch, spec):
    (tmp_path / "helpers.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(tmp_path / 'ran')!r}).write_text("imported")
        def build():
            Path({str(tmp_path / 'ran')!r}).write_text("called")
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("helpers", None)
    path = craft(tmp_path / "m.safetensors", edit=_edit("spec", spec))
    code, stdout, stderr = run(capsys, "inspect", path, "--out", tmp_path / "out", "--quiet")
    assert code == 0, stderr
    assert f"built from {spec!r}" in stdout.replace("says it was built from", "built from")
    assert run(capsys, "report", path)[0] == 0
    assert not (tmp_path / "ran").exists(), "inspect or report imported or called code named in the file"
    assert "helpers" not in sys.modules


def test_inspect_writes_only_inside_out(capsys, tmp_path):
    def edit(info):
        info["code"] = {"/../../escaped:eval": "x", "../escaped2:train": "y", "..": "z"}

    path = craft(tmp_path / "m.safetensors", edit=edit)
    out = tmp_path / "a" / "b" / "out"
    code, _, stderr = run(capsys, "inspect", path, "--out", out, "--quiet")
    assert code == 0, stderr
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and p != path]
    assert outside == []
    assert len(list(out.glob("code_*.py"))) == 3


def test_factory_that_exits_fails_the_command(capsys, tmp_path, monkeypatch):
    (tmp_path / "quitter.py").write_text("import sys\ndef build():\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("quitter", None)
    code, _, stderr = run(capsys, "convert", "quitter:build", "--out", tmp_path / "out", "--quiet")
    assert code == 1 and "called sys.exit(0) instead of returning a model" in stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_config_that_is_not_an_object_says_so(capsys, tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    code, _, stderr = run(capsys, "convert", "timm:x", "--config", tmp_path / "c.json", "--out", tmp_path / "o")
    assert code == 1 and "must hold a JSON object of RPQConfig settings" in stderr and "got a JSON list" in stderr


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    assert not rpq_fx.io.process_alive(dead)
    stale = tmp_path / f".m.safetensors.tmp-{dead}"
    stale.write_bytes(b"half a file")
    live = tmp_path / f".m.safetensors.tmp-{os.getpid()}x"  # not a PID suffix: left alone
    live.write_bytes(b"")
    partial = tmp_path / f".rpq-fx-partial-{dead}"
    partial.mkdir()
    rpq_fx.save(rpq_fx.load(Format1Net(), FIXTURE), tmp_path / "m.safetensors")
    assert not stale.exists() and live.exists()
    cli._clean_partial(tmp_path)
    assert not partial.exists()


def test_convert_replaces_the_previous_runs_outputs_together(capsys, tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(textwrap.dedent("""
        from torch import nn
        def build():
            return nn.Sequential(nn.Linear(16, 300))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiny", None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("previous run")
    (out / "graph.svg").write_text("previous run")
    code, _, stderr = run(capsys, "convert", "tiny:build", "--codebook-dim", "4", "--no-graph", "--quiet", "--out", out)
    assert code == 0, stderr
    assert (out / "report.md").read_text() != "previous run"
    assert not (out / "graph.svg").exists(), "an earlier run's output is removed with the rest"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "report.md"]


def test_hot_row_index_out_of_range_is_refused(tmp_path):
    def build():
        return torch.nn.Sequential(torch.nn.Embedding(600, 32))

    config = rpq_fx.RPQConfig(codebook_dim=8, num_codes=16, hot_rows=4, hot_codebook_dim=8)
    converted = rpq_fx.convert(build(), config=config)
    source = rpq_fx.save(converted, tmp_path / "hot.safetensors")
    rpq_fx.load(build(), source)
    index = torch.tensor([0, 1, 2, 600], dtype=torch.int32)
    path = craft(tmp_path / "m.safetensors", source=source, tensors={"0.weight.hot_index": index})
    with pytest.raises(RPQCheckpointError, match=r"0.weight.hot_index: value 600 is out of range: must be in \[0, 600\)"):
        rpq_fx.load(build(), path)


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import rpq_fx, rpq_fx.io
from test_io_format1 import FIXTURE, Format1Net

def killed(tensors, path, metadata):  # half a file written, then the process is killed
    open(path, "wb").write(b"half")
    os.kill(os.getpid(), signal.SIGKILL)

model = rpq_fx.load(Format1Net(), FIXTURE)
rpq_fx.io.save_file = killed
rpq_fx.save(model, {path!r})
"""

KILLED_CONVERT = """
import os, signal, sys
import rpq_fx
from rpq_fx import cli

def killed(*args, **kwargs):  # the checkpoint is saved, the report not yet written
    os.kill(os.getpid(), signal.SIGKILL)

rpq_fx.Report.to_markdown = killed
sys.path.insert(0, {folder!r})
cli.main(["convert", "tiny:build", "--codebook-dim", "4", "--no-graph", "--quiet", "--out", {out!r}])
"""


def _killed(script: str) -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr


def test_a_writer_killed_mid_write_leaves_nothing_loadable_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "m.safetensors"
    _killed(KILLED_WRITER.format(tests=str(Path(__file__).parent), path=str(path)))
    assert not path.exists(), "a killed save leaves nothing under the checkpoint's name"
    assert len(list(tmp_path.glob(".m.safetensors.tmp-*"))) == 1
    rpq_fx.save(rpq_fx.load(Format1Net(), FIXTURE), path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_convert_killed_after_saving_keeps_the_previous_runs_outputs_together(capsys, tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Linear(16, 300))\n")
    out = tmp_path / "out"
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tiny", None)
    assert run(capsys, "convert", "tiny:build", "--codebook-dim", "8", "--no-graph", "--quiet", "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _killed(KILLED_CONVERT.format(folder=str(tmp_path), out=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    assert len(list(out.glob(".rpq-fx-partial-*"))) == 1, "the killed run's work stays hidden"
    assert run(capsys, "convert", "tiny:build", "--codebook-dim", "4", "--no-graph", "--quiet", "--out", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "report.md"]
    assert rpq_fx.checkpoint_info(out / "model.safetensors")["config"]["codebook_dim"] == 4
