"""Fuzz (issue 19, done-when): random and adversarial checkpoints, derived from the committed format-1
fixture, through ``load``, ``checkpoint_info``, ``checkpoint_report`` and ``rpq-fx inspect`` /
``report``. Each either succeeds or raises :class:`RPQCheckpointError` (the CLI: exit 1, one line);
nothing crashes, hangs (an alarm per example), grows memory without bound or writes outside --out."""

import contextlib
import copy
import hashlib
import io
import json
import resource
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import rpq_fx
from rpq_fx import RPQCheckpointError, cli
from test_io_format1 import FIXTURE, Format1Net

with safe_open(FIXTURE, framework="pt") as _f:
    METADATA = dict(_f.metadata())
    TENSORS = {k: _f.get_tensor(k) for k in _f.keys()}
_RAW = FIXTURE.read_bytes()
_HEADER_LEN = int.from_bytes(_RAW[:8], "little")
HEADER = json.loads(_RAW[8:8 + _HEADER_LEN])
DATA = _RAW[8 + _HEADER_LEN:]
INFO = json.loads(METADATA["rpq_fx"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from([-1, 0, 1, 2**31, 2**63, "float32", "U8", "../x", "/../../x", "__class__", "os:abort"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
layer_values = (st.none() | st.booleans() | st.integers(-2, 70_000) | st.sampled_from(["float32", "uint8", "x", ""])
                | st.lists(st.integers(-1, 70_000), max_size=4) | st.lists(st.text(max_size=3), max_size=3))


def _like(value) -> st.SearchStrategy:
    """Values of the type ``value`` has (a count, a flag, a shape), so the record's type checks pass
    and its meaning is what gets tested."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, list):
        return st.lists(st.integers(-1, 300), max_size=4) if all(isinstance(v, int) for v in value) else st.just(value)
    if isinstance(value, float):
        return st.floats(allow_nan=False) | st.none()
    return st.none() | st.integers(-1, 300) | st.sampled_from([65536, 2**40])


deep = st.integers(1, 50_000).map(lambda n: json.loads("[" * n + "]" * n) if n < 600 else "deep")


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _replace(root, path, value):
    if not path:
        return value
    root = copy.deepcopy(root)
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _digests(tensors):
    return {k: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for k, t in tensors.items()}


def _file(header: dict, data: bytes, metadata: dict | None = None, text: str | None = None) -> bytes:
    header = dict(header)
    if metadata is not None:
        header["__metadata__"] = metadata
    body = (text if text is not None else json.dumps(header)).encode()
    return len(body).to_bytes(8, "little") + body + data


def _with_info(info, tensors=None) -> bytes:
    """The fixture with the rpq_fx JSON ``info`` (or raw text) and checksums recomputed: an edit, not an accident."""
    tensors = tensors or TENSORS
    if isinstance(info, dict):
        info = {**info, "sha256": _digests(tensors)} if isinstance(info.get("sha256"), dict) else info
    text = "[" * 100_000 + "]" * 100_000 if info == "deep" else json.dumps(info, sort_keys=True)
    meta = {**METADATA, "rpq_fx": text, "rpq_fx_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if tensors is TENSORS:
        return _file(HEADER, DATA, meta)
    from safetensors.torch import save
    return save(tensors, meta)


class Sample(bytes):
    """A file's bytes, shown by how it was made (hypothesis prints failing examples)."""

    how = ""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.how}>"


@st.composite
def checkpoints(draw) -> Sample:
    kind = draw(st.sampled_from(["bytes", "flip", "json", "layer", "config", "free", "header", "tensor", "metadata"]))
    sample = Sample(draw(_contents(kind)))
    sample.how = f"{kind} {draw(st.just(_LAST[0]))}"
    return sample


_LAST = [""]  # what the last _contents changed, for Sample's repr


@st.composite
def _contents(draw, kind: str) -> bytes:
    _LAST[0] = ""
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "flip":
        raw = bytearray(_RAW)
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "json":  # one value anywhere in the rpq_fx JSON replaced, checksums recomputed
        paths = list(_paths(INFO))
        path = paths[draw(st.integers(0, len(paths) - 1))]
        value = draw(json_values | deep)
        _LAST[0] = f"{list(path)} = {str(value)[:80]}"
        return _with_info(_replace(INFO, path, value))
    if kind == "layer":  # fields of one conversion-record entry set to small, plausible-looking values
        i = draw(st.integers(0, len(INFO["layers"]) - 1))
        keys = draw(st.lists(st.sampled_from(sorted(INFO["layers"][i])), min_size=1, max_size=3, unique=True))
        fields = {key: draw(_like(INFO["layers"][i][key]) | layer_values) for key in keys}
        _LAST[0] = f"layers[{i}] |= {str(fields)[:80]}"
        return _with_info(_replace(INFO, ("layers", i), {**INFO["layers"][i], **fields}))
    if kind == "config":  # settings of the saved config set to values of their type: load converts with them
        keys = draw(st.lists(st.sampled_from(sorted(INFO["config"])), min_size=1, max_size=3, unique=True))
        fields = {key: draw(_like(INFO["config"][key]) | layer_values) for key in keys}
        _LAST[0] = f"config |= {str(fields)[:80]}"
        return _with_info(_replace(INFO, ("config",), {**INFO["config"], **fields}))
    if kind == "free":  # nested or odd values where the format holds free-form JSON: readers must not choke
        where = draw(st.sampled_from([("config", "overrides", "x"), ("extra",), ("layers", 0, "extra"),
                                      ("architecture", "extra")]))
        value = draw(json_values | deep | st.integers(1, 600).map(lambda n: json.loads("[" * n + "]" * n)))
        _LAST[0] = f"{list(where)} = {str(value)[:80]}"
        return _with_info(_replace(INFO, where, value))
    if kind == "header":  # one value anywhere in the safetensors header replaced
        paths = list(_paths(HEADER))[1:]
        path = paths[draw(st.integers(0, len(paths) - 1))]
        value = draw(json_values | deep)
        _LAST[0] = f"{list(path)} = {str(value)[:80]}"
        return _file(_replace(HEADER, path, value), DATA)
    if kind == "metadata":  # the safetensors metadata replaced by another value, or one of its entries
        key = draw(st.sampled_from(["format", "format_version", "rpq_fx", "rpq_fx_sha256", None]))
        value = draw(json_values)
        _LAST[0] = f"{key} = {str(value)[:80]}"
        return _file({k: v for k, v in HEADER.items() if k != "__metadata__"}, DATA,
                     {**METADATA, key: value} if key else value)
    name = draw(st.sampled_from(sorted(TENSORS)))  # random values in one tensor, checksums recomputed
    _LAST[0] = name
    tensor = TENSORS[name]
    raw = draw(st.binary(min_size=tensor.numel() * tensor.element_size(), max_size=tensor.numel() * tensor.element_size()))
    changed = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(tensor.dtype).reshape(tensor.shape)
    return _with_info(INFO, {**TENSORS, name: changed})


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise TimeoutError if the block runs longer than ``seconds`` (a hang fails instead of stalling)."""
    def handler(signum, frame):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def peak_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024, f"the fuzz raised the process's peak memory by {grown_mib:.0f} MiB"


@pytest.mark.filterwarnings("ignore:convert. RPQConfig.overrides patterns")  # crafted configs name no layer
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=checkpoints())
def test_any_file_is_read_or_refused_with_a_checkpoint_error(peak_memory, raw):
    with tempfile.TemporaryDirectory() as folder, alarm(20):
        folder = Path(folder)
        path = folder / "m.safetensors"
        path.write_bytes(raw)
        for read in (rpq_fx.checkpoint_info, rpq_fx.checkpoint_report, lambda p: rpq_fx.load(Format1Net(), p)):
            try:
                read(path)
            except RPQCheckpointError:
                pass
        for argv in (["inspect", path, "--out", folder / "out", "--quiet"], ["report", path]):
            code, err = _cli(*argv)
            assert code == 0 or (code == 1 and err.count("\n") == 1 and err.startswith("rpq-fx: error: ")), err
            try:  # the same with --traceback: any exception but RPQCheckpointError fails the test
                _cli("--traceback", *argv)
            except RPQCheckpointError:
                pass
        outside = {p for p in folder.rglob("*") if p != path and folder / "out" not in [p, *p.parents]}
        assert outside == set(), f"written outside --out: {sorted(outside)}"
