"""Deployment exports: torch.export keeps the expansion as one named op; ONNX lowers it to Gather,
stays compressed on disk and computes in onnxruntime what PyTorch computes."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import rpq_fx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXPAND = torch.ops.rpq_fx.expand.default
MIB = 1024**2


def is_rpq_op(node) -> bool:
    """``rpq_fx::expand``, or a compressed-domain ``rpq_fx`` op (linear, embedding) it was fused into."""
    return node.op == "call_function" and getattr(node.target, "namespace", "") == "rpq_fx"


def run_onnx(path, *inputs) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def initializers(path) -> dict[str, tuple[int, tuple[int, ...]]]:
    model = onnx.load(str(path))
    return {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}


def model_bytes(model) -> int:
    return round(rpq_fx.model_size(model) * MIB)


def test_torch_export_keeps_one_named_op_per_use(zoo):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), num_codebooks=2)
    tokens = torch.randint(0, 4000, (2, 7))
    program = torch.export.export(gm, (tokens,))
    nodes = list(program.graph.nodes)
    assert [n.target for n in nodes if is_rpq_op(n)] == [n.target for n in gm.graph.nodes if is_rpq_op(n)]
    assert sum(is_rpq_op(n) for n in nodes) == 2, "tied weight: one rpq_fx op per use, as in the fx graph"
    codes = [n for n in nodes if n.op == "placeholder" and n.name.endswith("weight_codes")]
    assert codes and all(all(is_rpq_op(u) for u in n.users) for n in codes), "codes only feed rpq_fx ops"
    assert not any(n.target in (torch.ops.aten.embedding.default, torch.ops.aten.index_select.default)
                   for n in nodes), "nothing decomposed: the ops stay opaque"
    assert torch.equal(program.module()(tokens), gm(tokens))


def test_torch_export_of_a_checkpointed_model_in_eval(zoo):
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5, num_codes=16, checkpoint=True).eval()
    assert any(n.target is torch.utils.checkpoint.checkpoint for n in gm.graph.nodes)
    x = torch.randn(2, 1, 28, 28)
    program = torch.export.export(gm, (x,))
    assert sum(n.target is EXPAND for n in program.graph.nodes) == 2, "conv1 and conv2, out of their checkpoints"
    assert torch.equal(program.module()(x), gm(x))


def test_onnx_matches_pytorch_and_stays_compressed(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5, num_codes=16).eval()  # 15x smaller
    x = torch.randn(3, 1, 28, 28)
    path = rpq_fx.export_onnx(gm, (x,), tmp_path / "lenet.onnx",
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    size, compressed, dense = path.stat().st_size, model_bytes(gm), model_bytes(zoo.LeNet())
    assert size < compressed * 1.03 + 32 * 1024, f"{size} bytes on disk for a {compressed}-byte model"
    assert size < dense / 10
    weights = initializers(path)
    assert weights["fc1.weight.codes"] == (onnx.TensorProto.UINT8, (5, 500))
    assert not any(shape == (500, 800) for _, shape in weights.values()), "no dense fc1 weight in the file"
    assert all(np.prod(shape) < 64 for kind, shape in weights.values() if kind == onnx.TensorProto.INT64), \
        "no folded int64 copy of the codes"
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Gather", "Cast"} <= ops
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = gm(x)
        (actual,) = run_onnx(path, x)
        np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_onnx_shared_codebooks_and_tied_weight(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), codebook_dim=8, shared_codebooks=True).eval()
    tokens = torch.randint(0, 4000, (2, 9))
    path = rpq_fx.export_onnx(gm, (tokens,), tmp_path / "tied.onnx")
    assert path.stat().st_size < model_bytes(gm) * 1.03 + 32 * 1024
    with torch.no_grad():
        expected = gm(tokens)
    (actual,) = run_onnx(path, tokens)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(50000, 16)

    def forward(self, tokens):
        return self.table(tokens)


def test_onnx_int16_codes_above_32767_read_unsigned(tmp_path):
    gm = rpq_fx.convert(Table(), codebook_dim=1, shared_codebooks=True, num_codes=40000).eval()
    codes = gm.table.weight.codes
    assert codes.dtype == torch.int16 and int(codes.min()) < 0, "codes above 32767 are stored as negative int16"
    tokens = torch.randint(0, 50000, (4, 33))
    path = rpq_fx.export_onnx(gm, (tokens,), tmp_path / "table.onnx")
    assert initializers(path)["table.weight.codes"][0] == onnx.TensorProto.INT16
    (actual,) = run_onnx(path, tokens)
    with torch.no_grad():
        assert np.array_equal(actual, gm(tokens).numpy()), "a pure gather is exact"


def test_onnx_keeps_half_precision_codebooks_in_half(tmp_path):
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 300)).eval()
    gm = rpq_fx.convert(net, codebook_dim=4, codebook_dtype="float16").eval()
    x = torch.randn(3, 64)
    path = rpq_fx.export_onnx(gm, (x,), tmp_path / "half.onnx")
    (out,) = run_onnx(path, x)
    np.testing.assert_allclose(out, gm(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    float16 = onnx.TensorProto.FLOAT16
    codebooks = [dims for dtype, dims in initializers(path).values() if dtype == float16]
    assert len(codebooks) == 2 and all(len(dims) == 3 for dims in codebooks)
    assert path.stat().st_size < 1.2 * model_bytes(gm)


def test_onnx_adds_the_hot_rows_and_stores_them_compressed(tmp_path):
    gm = rpq_fx.convert(Table(), config=rpq_fx.RPQConfig(codebook_dim=8, hot_rows=300, hot_codebook_dim=2)).eval()
    with torch.no_grad():
        gm.table.weight.hot.codebooks.normal_()  # a fresh hot part adds zero: give it something to add
    tokens = torch.cat([gm.table.weight.hot_index[:40].long(), torch.randint(0, 50000, (92,))]).view(4, 33)
    path = rpq_fx.export_onnx(gm, (tokens,), tmp_path / "hot.onnx")
    assert initializers(path)["table.weight.hot.codes"][0] == onnx.TensorProto.UINT8
    (actual,) = run_onnx(path, tokens)
    with torch.no_grad():
        expected = gm(tokens).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
    assert path.stat().st_size < 1.2 * (model_bytes(gm) + 4 * 50000)  # + each row's hot slot, folded


def test_onnx_of_a_fused_convolution_matches_the_dense_reference(tmp_path):
    net = nn.Sequential(nn.Conv2d(512, 288, 3, stride=2, padding=1, groups=2), nn.ReLU()).eval()  # 2.65 MB weight
    gm = rpq_fx.convert(copy.deepcopy(net), num_codebooks=24).eval()
    assert [n.target for n in gm.graph.nodes if is_rpq_op(n)] == [torch.ops.rpq_fx.conv.default], \
        "a weight above 2 MiB is one rpq_fx::conv node"
    dense = copy.deepcopy(net)  # the original architecture running the expanded weights
    dense.load_state_dict(rpq_fx.decompress(gm), strict=False)
    x = torch.randn(2, 512, 9, 11)
    path = rpq_fx.export_onnx(gm, (x,), tmp_path / "conv.onnx")
    assert "Conv" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not any(shape == (288, 256, 3, 3) for _, shape in initializers(path).values()), "no dense weight on disk"
    with torch.no_grad():
        expected = dense(x)
    (actual,) = run_onnx(path, x)
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-4, atol=1e-4)
