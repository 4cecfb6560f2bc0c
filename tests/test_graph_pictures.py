"""Pictures of large models: repeated blocks drawn once ("x6"), a whole-model picture for models
converted in place, and graph.html (module tree + zoomable picture) checked in a real headless browser."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx import export as export_mod
from rpq_fx.nn.weight import rpq_weights

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: `apt-get install chromium` to "
                                                            "check graph.html as a browser renders it")


class Block(nn.Module):
    def __init__(self, hidden=256):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 64)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tower(nn.Module):
    def __init__(self, hidden_sizes):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(h) for h in hidden_sizes])
        self.head = nn.Linear(64, 512)

    def forward(self, x):
        return self.head(self.blocks(x))


def convert(model):
    return rpq_fx.convert(model.eval(), num_codebooks=4, num_codes=16, progress=False)


def all_clusters(graph) -> list:
    found = []
    for sub in graph.get_subgraphs():
        found += [sub, *all_clusters(sub)]
    return found


def drawn_nodes(graph) -> set[str]:
    names = {n.get_name().strip('"') for n in graph.get_nodes()} - {"node", "edge", "graph"}
    for sub in graph.get_subgraphs():
        names |= drawn_nodes(sub)
    return names


def reaches(edges: set[tuple[str, str]], start: str, end: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for a, b in edges:
            if a == here and b not in seen:
                seen.add(b)
                todo.append(b)
    return end in seen


def is_acyclic(edges: set[tuple[str, str]]) -> bool:
    nodes = {n for e in edges for n in e}
    incoming = {n: sum(1 for _, b in edges if b == n) for n in nodes}
    ready = [n for n, k in incoming.items() if k == 0]
    done = 0
    while ready:
        here = ready.pop()
        done += 1
        for a, b in edges:
            if a == here:
                incoming[b] -= 1
                if incoming[b] == 0:
                    ready.append(b)
    return done == len(nodes)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(copies=st.integers(2, 7))
def test_a_repeated_block_is_drawn_once_with_its_count(copies):
    gm = convert(Tower([256] * copies))
    graph = export_mod._dot_graph(gm, "Tower")
    labels = [c.get("label") for c in all_clusters(graph)]
    assert [label for label in labels if "drawn once" in label] == [f'"blocks.0 .. blocks.{copies - 1}: x{copies}, '
                                                                    'drawn once"']
    rpq_boxes = [label for label in labels if label.startswith('"RPQ')]
    assert len(rpq_boxes) == 3, "the first block's fc1 and fc2, and the head: the copies' are not drawn again"
    names = drawn_nodes(graph)
    dense_reads = {n.name for n in gm.graph.nodes
                   if n.op == "get_attr" and not n.target.endswith(("codebooks", "codes"))}
    assert dense_reads == {f"blocks_{i}_fc{j}_bias" for i in range(copies) for j in (1, 2)} | {"head_bias"}
    assert {n.name for n in gm.graph.nodes if n.name.startswith("blocks_0_")} - dense_reads <= names
    assert not dense_reads & names, "a bias read is not drawn: graph.txt lists it"
    assert not {n for n in names if re.match(r"blocks_[1-9]", n)}, "no node of a later copy is drawn"
    edges = {(e.get_source().strip('"'), e.get_destination().strip('"')) for e in graph.get_edges()}
    assert {a for e in edges for a in e} <= names
    assert reaches(edges, "x", "output") and is_acyclic(edges), "one drawing from input to output, no loop back"


def test_blocks_that_differ_are_each_drawn():
    graph = export_mod._dot_graph(convert(Tower([256, 128, 256])), "Tower")
    labels = [c.get("label") for c in all_clusters(graph)]
    assert not [label for label in labels if "drawn once" in label]
    assert len([label for label in labels if label.startswith('"RPQ')]) == 7
    names = drawn_nodes(graph)
    assert all(any(n.startswith(f"blocks_{i}_fc2") for n in names) for i in range(3)), "every block is drawn"


def svg_size(path) -> tuple[float, float]:
    root = ET.parse(path).getroot()
    return tuple(float(root.get(k).removesuffix("pt")) for k in ("width", "height"))


def test_convnext_picture_is_a_readable_size(tmp_path):
    timm = pytest.importorskip("timm")
    gm = rpq_fx.RPQ(timm.create_model("convnext_atto", pretrained=False).eval(), progress=False)
    out = rpq_fx.export_graph(gm, tmp_path)
    width, height = svg_size(out / "graph.svg")
    assert width < 2000 and height < 6000, (width, height)  # was 9289 x 46323 pt, every block drawn
    texts = " ".join(t.text or "" for t in ET.parse(out / "graph.svg").getroot().iter(f"{SVG}text"))
    assert "stages.2.blocks.0 .. stages.2.blocks.5: x6, drawn once" in texts


@pytest.fixture(scope="module")
def bert_in_place():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=512,
                                     vocab_size=1000, max_position_embeddings=64)
    torch.manual_seed(0)
    model = rpq_fx.convert(transformers.BertModel(config).eval(), num_codebooks=4, num_codes=16, progress=False)
    assert not isinstance(model, torch.fx.GraphModule), "the in-place path"
    return model


def node_texts(svg_path) -> dict[str, str]:
    """``{node name: its text}`` of an SVG written by Graphviz."""
    root = ET.parse(svg_path).getroot()
    return {g.find(f"{SVG}title").text: " ".join(t.text or "" for t in g.iter(f"{SVG}text"))
            for g in root.iter(f"{SVG}g") if g.get("class") == "node"}


def test_a_model_converted_in_place_gets_one_whole_model_picture(bert_in_place, tmp_path):
    out = rpq_fx.export_graph(bert_in_place, tmp_path)
    texts = node_texts(out / "graph.svg")
    assert "encoder.layer.0 .. encoder.layer.2 BertLayer x3, drawn once" == texts["encoder_layer_0"]
    assert not {n for n in texts if n.startswith(("encoder_layer_1", "encoder_layer_2"))}
    query = type(bert_in_place.encoder.layer[0].attention.self.query).__name__  # Linear, or an rpq_fx layer
    assert texts["encoder_layer_0_attention_self_query"] == f"query {query} RPQ 64x64, C=4 K=16 d=16"
    embedding = type(bert_in_place.embeddings.word_embeddings).__name__
    assert texts["embeddings_word_embeddings"] == f"word_embeddings {embedding} RPQ 1000x64, C=4 K=16 d=16"
    index = (out / "index.md").read_text()
    assert "[graph.svg](graph.svg)" in index and "[graph.html](graph.html)" in index
    assert not list(out.glob("*/graph.svg")), "no five-node picture per layer"


class OddNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleDict({"x\\y": nn.Linear(64, 512), "<b>&": nn.Linear(64, 512), "q'r": nn.Linear(64, 512)})

    def forward(self, x):
        for part in self.parts.values():
            x = x + part(x)[:, :64]
        return x


# reason: convert first tries torch.fx, whose generated code quotes the name x\y as an escape sequence
@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
def test_module_names_are_drawn_as_they_are(tmp_path):
    model = rpq_fx.convert(OddNames(), num_codebooks=4, num_codes=16, capture="module", progress=False)
    out = rpq_fx.export_graph(model, tmp_path)
    texts = node_texts(out / "graph.svg")
    assert {texts["parts_x\\y"], texts["parts_<b>&"], texts["parts_q'r"]} == {
        f"{name} {type(model.parts[name]).__name__} RPQ 512x64, C=4 K=16 d=16" for name in ("x\\y", "<b>&", "q'r")}
    assert '"name": "<b>&"' in (out / "graph.html").read_text(), "the tree data holds the name as it is"


def test_graph_html_is_self_contained(bert_in_place, tmp_path):
    text = (rpq_fx.export_graph(bert_in_place, tmp_path) / "graph.html").read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", text), "nothing loaded from elsewhere"
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg",
                                                              "http://www.w3.org/1999/xlink"}
    tree = json.loads(re.search(r'<script type="application/json" id="rpq-tree">(.*?)</script>', text, re.S)[1])
    paths = set()

    def walk(item):
        paths.add(item["path"])
        for child in item["children"]:
            walk(child)

    walk(tree)
    assert {name for name, _ in bert_in_place.named_modules()} <= paths, "every module is in the tree"


def browser(*args: str) -> str:
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_browser
def test_graph_html_renders_the_tree_and_marks_a_selected_module(tmp_path):
    gm = convert(Tower([256] * 3))
    page = rpq_fx.export_graph(gm, tmp_path) / "graph.html"
    dom = browser("--window-size=1200,800", "--dump-dom", f"{page.as_uri()}#select=blocks.0.fc1")
    assert 'data-ready="yes"' in dom, "the page's script ran to the end"
    items = re.findall(r'<li data-path="([^"]*)" data-drawn="[^"]*" class="([^"]*)"', dom)
    assert {path for path, _ in items} == {name for name, _ in gm.named_modules()}, "the tree, built by the script"
    assert ("blocks.0.fc1", "module selected") in items
    assert sum("rpq-weight" in cls for _, cls in items) == len(rpq_weights(gm)) == 7
    hits = re.findall(r'<g id="[^"]*" class="node hit">\s*<title>([^<]*)</title>', dom)
    assert hits and all(h.startswith("blocks_0_fc1") for h in hits), hits
    status = re.search(r'<div id="status">([^<]*)</div>', dom)[1]
    assert status == f"{len(items)} modules, 7 RPQ weights; blocks.0.fc1: {len(hits)} nodes marked"
    assert re.search(r'<svg [^>]*style="transform: translate\(', dom), "the picture is placed by the zoom code"

    dom = browser("--window-size=1200,800", "--dump-dom", f"{page.as_uri()}#select=blocks.2.fc1")
    copies = re.findall(r'<g id="[^"]*" class="node hit">\s*<title>([^<]*)</title>', dom)
    assert copies == hits, "a later copy marks the one block drawn"
    status = re.search(r'<div id="status">([^<]*)</div>', dom)[1]
    assert status.endswith(f"; blocks.2.fc1: {len(hits)} nodes marked (drawn once, as blocks.0.fc1)")


FIT_CHECK = """<!DOCTYPE html><html><body>%s<pre id="overflow"></pre><script>
const bad = [];
document.querySelectorAll('g.node').forEach(g => {
  const shape = g.querySelector('path,polygon,ellipse').getBBox();
  g.querySelectorAll('text').forEach(t => { const b = t.getBBox();
    if (b.x < shape.x - 1 || b.x + b.width > shape.x + shape.width + 1)
      bad.push(g.querySelector('title').textContent); });
});
const count = document.querySelectorAll('g.node').length;
document.getElementById('overflow').textContent = JSON.stringify({nodes: count, bad});
</script></body></html>"""


@needs_browser
def test_every_label_fits_its_box_as_a_browser_draws_it(bert_in_place, tmp_path):
    timm = pytest.importorskip("timm")
    pictures = [rpq_fx.export_graph(bert_in_place, tmp_path / "bert") / "graph.svg",
                rpq_fx.export_graph(convert(Tower([256] * 3)), tmp_path / "tower") / "graph.svg",
                rpq_fx.export_graph(rpq_fx.RPQ(timm.create_model("test_convnext").eval(), progress=False),
                                    tmp_path / "convnext") / "graph.svg"]
    doctored = tmp_path / "doctored.svg"  # the check itself: one label made too long for its box
    doctored.write_text(re.sub(r"(<title>pooler_dense</title>.*?<text[^>]*>)[^<]*", r"\1" + "pooler " * 20,
                               pictures[0].read_text(), count=1, flags=re.S))
    for svg in [*pictures, doctored]:
        page = svg.with_suffix(".fit.html")
        page.write_text(FIT_CHECK % svg.read_text()[svg.read_text().index("<svg"):])
        dom = browser("--dump-dom", page.as_uri())
        result = json.loads(re.search(r'<pre id="overflow">(.*?)</pre>', dom, re.S)[1].replace("&quot;", '"'))
        assert result["nodes"] > 10 and result["bad"] == ([] if svg != doctored else ["pooler_dense"]), (svg, result)
