"""export_graph: code, node table, report, and the picture with the RPQ expansions marked."""

import json
import warnings
import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx import export as export_mod

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    monkeypatch.setattr(export_mod, "_warned", False)
    monkeypatch.delenv("RPQ_FX_DOT", raising=False)


def clusters(svg_path):
    """``{cluster title: [text in it]}`` of an SVG written by Graphviz."""
    root = ET.parse(svg_path).getroot()
    assert root.tag == f"{SVG}svg"
    out = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "cluster":
            out[group.find(f"{SVG}title").text] = [t.text for t in group.iter(f"{SVG}text") if t.text]
    return out


def node_fills(svg_path) -> dict[str, str]:
    """``{node name: fill colour}`` of an SVG written by Graphviz."""
    root = ET.parse(svg_path).getroot()
    out = {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "node":
            shape = next(p for p in group if p.tag in (f"{SVG}path", f"{SVG}polygon"))
            out[group.find(f"{SVG}title").text] = shape.get("fill", "").lower()
    return out


def boxed(gm) -> dict[str, set[str]]:
    """``{cluster label: node names in it}`` of the drawing's graph."""
    graph = export_mod._dot_graph(gm, "g")
    return {sub.get("label"): {n.get_name().strip('"') for n in sub.get_nodes()} for sub in graph.get_subgraphs()}


def rpq_ops(gm) -> list:
    """The nodes that read RPQ weights: ``rpq_fx::expand``, or a fused compressed-domain ``rpq_fx`` op."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == "rpq_fx"]


def test_export_writes_every_file_and_a_picture_with_marked_expansions(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5)
    out = rpq_fx.export_graph(gm, tmp_path / "lenet")
    assert {p.name for p in out.iterdir()} == {"code.py", "graph.txt", "graph.svg", "graph.html", "report.md",
                                           "report.json"}
    (op,) = rpq_ops(gm)  # the expansion, or the compressed-domain linear it was fused into
    assert f"torch.ops.rpq_fx.{op.target.__name__}" in (out / "code.py").read_text()
    assert op.target.__name__ in (out / "graph.txt").read_text()
    assert json.loads((out / "report.json").read_text())["totals"]["converted"] == 1
    found = clusters(out / "graph.svg")
    assert len(found) == 1
    label = " ".join(next(iter(found.values())))
    assert "RPQ fc1.weight" in label and ": 500x800 from C=5 K=256 d=160, codes uint8" in label
    colours = node_fills(out / "graph.svg")
    assert colours[op.name] == export_mod.EXPAND_COLOR, "the rpq_fx op is filled orange"
    assert colours["fc1_weight_codebooks"] == colours["fc1_weight_codes"] == export_mod.EXPAND_INPUT_COLOR
    assert colours["fc2"] != export_mod.EXPAND_COLOR, "a dense layer is not marked"
    (members,) = boxed(gm).values()
    assert {"fc1_weight_codebooks", "fc1_weight_codes", op.name} <= members


def test_the_cast_of_half_precision_codebooks_is_boxed_with_them(zoo):
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5, codebook_dtype="float16")
    (members,) = boxed(gm).values()
    assert {"fc1_weight_codebooks", "fc1_weight_codebooks_float32", "fc1_weight_codes"} <= members


def test_every_use_of_a_shared_weight_is_boxed(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.TiedLM(vocab=4000).eval(), num_codebooks=2)
    out = rpq_fx.export_graph(gm, tmp_path / "tied")
    found = clusters(out / "graph.svg")
    assert len(rpq_ops(gm)) == 2 and len(found) == 2
    assert all(any("RPQ emb.weight" in t or "RPQ lm_head.weight" in t for t in texts) for texts in found.values())


def test_conv_view_and_checkpointed_expansions_are_marked(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.ConvVariants(), num_codebooks=16)
    inside = set().union(*boxed(gm).values())
    views = [n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"
             and n.args[0].target is torch.ops.rpq_fx.expand.default]
    assert views and set(views) <= inside, "the view to the conv weight's shape belongs to the expansion"
    checkpointed = rpq_fx.convert(zoo.ConvVariants(), num_codebooks=16, checkpoint=True)
    calls = [n for n in checkpointed.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    # the grouped conv's 2.4 MB weight is one rpq_fx::conv node (no dense weight kept for backward), left alone
    assert len(calls) == 4, "every other conv's expansion is checkpointed"
    assert [n.name for n in checkpointed.graph.nodes if n.target is torch.ops.rpq_fx.conv.default] == ["grouped"]
    out = rpq_fx.export_graph(checkpointed, tmp_path / "ck")
    titles = [" ".join(texts) for texts in clusters(out / "graph.svg").values()]
    assert len([t for t in titles if "checkpointed" in t]) == len(calls)
    assert all(node.name in set().union(*boxed(checkpointed).values()) for node in calls)


def test_without_graphviz_writes_graph_dot_and_says_so_once(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("RPQ_FX_DOT", "no-such-graphviz-program")
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5)
    with pytest.warns(export_mod.GraphvizMissingWarning, match="no Graphviz renderer found.*graph.dot"):
        out = rpq_fx.export_graph(gm, tmp_path / "a")
    assert (out / "graph.dot").exists() and not (out / "graph.svg").exists()
    source = (out / "graph.dot").read_text()
    assert source.startswith("digraph") and "subgraph cluster_rpq_0" in source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rpq_fx.export_graph(gm, tmp_path / "b")  # said once per process, not again
    assert (tmp_path / "b" / "graph.dot").exists()


def test_a_failing_renderer_falls_back_to_graph_dot(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("RPQ_FX_DOT", "false")  # a program that exits 1
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5)
    with pytest.warns(export_mod.GraphvizMissingWarning, match="failed"):
        out = rpq_fx.export_graph(gm, tmp_path)
    assert (out / "graph.dot").exists()


def test_the_installed_renderer_is_found():
    renderer = export_mod.find_renderer()
    assert renderer is not None, "graphviz-pure is a dependency of rpq_fx: `dot` should be available"


def test_picture_can_be_skipped(zoo, tmp_path):
    gm = rpq_fx.convert(zoo.LeNet().eval(), num_codebooks=5)
    out = rpq_fx.export_graph(gm, tmp_path, picture=False)
    assert not (out / "graph.svg").exists() and (out / "code.py").exists()


class WithConvertedParts(nn.Module):
    def __init__(self, zoo):
        super().__init__()
        self.encoder = rpq_fx.convert(zoo.SharedModule(), codebook_dim=16)
        self.head = rpq_fx.convert(nn.Sequential(nn.Linear(64, 512), nn.ReLU()), num_codebooks=4)
        self.plain = nn.Linear(512, 8)

    def forward(self, x):
        return self.plain(self.head(self.encoder(x)))


def test_model_with_converted_parts_gets_a_folder_per_part_and_an_index(zoo, tmp_path):
    model = WithConvertedParts(zoo)
    out = rpq_fx.export_graph(model, tmp_path)
    index = (out / "index.md").read_text()
    assert "2 converted graph parts" in index
    for part in ("encoder", "head"):
        assert f"[graph.svg]({part}/graph.svg)" in index
        assert (out / part / "code.py").exists() and clusters(out / part / "graph.svg")
    assert (out / "report.md").exists()
    with pytest.raises(TypeError, match="not a converted model and holds no RPQ weight"):
        rpq_fx.export_graph(zoo.LeNet(), tmp_path / "dense")
