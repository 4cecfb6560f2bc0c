"""``export_graph``: write a converted model out for a person to read.

For a converted GraphModule: ``code.py`` (the generated forward), ``graph.txt`` (the node table),
``graph.svg`` (the graph drawn by Graphviz, each RPQ expansion in an orange box: codebooks + codes
-> ``rpq_fx::expand`` -> the op that reads the weight, or codebooks + codes -> a compressed-domain
``rpq_fx::linear`` / ``rpq_fx::embedding``), ``graph.html`` (the module tree beside the picture,
zoomable, one self-contained page) and ``report.md`` / ``report.json``. Large models stay readable:
a run of alike blocks (``blocks.0`` .. ``blocks.11``) is drawn once in a blue box saying "x12",
``nn.Identity`` calls and dense parameter reads are left out (``graph.txt`` has every node), and
labels are short. Where no Graphviz renderer is found, ``graph.dot`` is written instead and a
warning says so, once per process.

The renderer is, in this order: the program named by ``$RPQ_FX_DOT``; ``graphviz-pure`` (a
self-contained port of Graphviz's ``dot``, installed by the ``graph`` extra); Graphviz's own ``dot``.

A model converted in place (a Hugging Face model), or one with converted parts
(``model.backbone = rpq_fx.convert(model.backbone, ...)``), gets one whole-model picture, its module
tree (``graph.svg`` / ``graph.html``), and a folder per converted part with its code, node table and
(for parts bigger than one layer) its own picture; ``index.md`` links them.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from tabulate import tabulate
from torch import nn

from ._graph_html import dot_key, module_tree, page
from ._graph_view import collapse, member_of, owners, repeated_runs
from ._optional import require
from .graph_module import graph_parts
from .nn.weight import RPQWeight, rpq_weights
from .passes import is_expansion
from .report import report

__all__ = ["export_graph", "draw_graph", "find_renderer", "node_table", "GraphvizMissingWarning"]

EXPAND_COLOR = "#ff922b"  # the rpq_fx op (expansion, or compressed-domain linear / embedding)
EXPAND_INPUT_COLOR = "#ffd8a8"  # get_attr codebooks / codes, and the view to the layer's shape
CLUSTER_COLOR = "#d9480f"
RENDER_TIMEOUT_S = 120

_warned = False


class GraphvizMissingWarning(UserWarning):
    """No Graphviz renderer: ``graph.dot`` was written instead of ``graph.svg``."""


def node_table(gm: fx.GraphModule) -> str:
    """One row per node (opcode, name, target, args, kwargs), as ``Graph.print_tabular`` but returned."""
    rows = [[n.op, n.name, getattr(n.target, "__name__", n.target) if n.op == "call_function" else n.target,
             n.args, n.kwargs] for n in gm.graph.nodes]
    return tabulate(rows, headers=["opcode", "name", "target", "args", "kwargs"])


def find_renderer() -> str | None:
    """The Graphviz program that draws ``graph.svg``, or None (see the module docstring for the order)."""
    chosen = os.environ.get("RPQ_FX_DOT")
    if chosen is not None:
        return shutil.which(chosen) or None
    scripts = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for name in ("graphviz-pure", "dot"):
        for folder in scripts if name == "graphviz-pure" else []:
            candidate = shutil.which(name, path=folder)
            if candidate:
                return candidate
        found = shutil.which(name)
        if found:
            return found
    return None


def _is_rpq_op(node: fx.Node) -> bool:
    """An ``rpq_fx`` op: the expansion, or a compressed-domain op reading codebooks and codes."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "rpq_fx"


def _is_checkpointed_expansion(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.utils.checkpoint.checkpoint or not node.args:
        return False
    body = node.args[0]
    if not (isinstance(body, fx.Node) and body.op == "get_attr"):
        return False
    sub = getattr(gm, body.target, None)
    return isinstance(sub, fx.GraphModule) and any(_is_rpq_op(n) for n in sub.graph.nodes)


def _codebook_inputs(node: fx.Node) -> list[fx.Node]:
    """The ``get_attr`` codebooks and codes an RPQ op reads, and the cast of half-precision codebooks."""
    inputs = []
    for a in node.all_input_nodes:
        if a.op == "call_method" and a.target == "to" and _codebook_inputs(a):
            inputs += [*_codebook_inputs(a), a]
        elif a.op == "get_attr" and a.target.rpartition(".")[2] in ("codebooks", "codes"):
            inputs.append(a)
    return inputs


def _regions(gm: fx.GraphModule) -> list[tuple[str, list[fx.Node]]]:
    """``(label, nodes)`` for every RPQ op: its codebooks and codes, the op, and (for an expansion)
    the view to the layer's weight shape."""
    regions = []
    for node in gm.graph.nodes:
        if _is_rpq_op(node):
            inputs = _codebook_inputs(node)
            members = inputs + [node]
            members += [u for u in node.users if u.op == "call_method" and u.target == "view"] if is_expansion(
                node) else []
            path = next((a.target.rpartition(".")[0] for a in inputs if a.target.endswith(".codebooks")), None)
            kind = "" if is_expansion(node) else f" ({node.target.name().removeprefix('rpq_fx::')}, compressed)"
            label = f"RPQ {path}{kind}" if path else f"RPQ {node.target.name()}"
            try:
                weight = gm.get_submodule(path) if path else None
            except AttributeError:
                weight = None
            if isinstance(weight, RPQWeight):
                label += (f": {'x'.join(map(str, weight.shape))} from C={weight.num_codebooks} K={weight.num_codes} "
                          f"d={weight.codebook_dim}, codes {str(weight.codes.dtype).removeprefix('torch.')}")
            regions.append((label, members))
        elif _is_checkpointed_expansion(gm, node):
            body, inputs = node.args[0], _codebook_inputs(node)
            path = next((a.target.rpartition(".")[0] for a in inputs if a.target.endswith(".codebooks")), body.target)
            regions.append((f"RPQ {path}, expansion checkpointed in {body.target}", [*inputs, body, node]))
    return regions


FONT = "Helvetica"


def _tensor_shape(gm: fx.GraphModule, target: str) -> str:
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else ""


def _node_label(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short label: what the node computes and where; graph.txt has every argument."""
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return f"{node.target}\\n{type(gm.get_submodule(node.target)).__name__}"
    if node.op == "get_attr":
        shape = _tensor_shape(gm, node.target)
        return f"{node.target}" + (f"\\n{shape}" if shape else "")
    op = node.target.name() if hasattr(node.target, "name") and callable(node.target.name) else \
        f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return op if op == node.name else f"{op}\\n{node.name}"


def _hidden(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Left out of the picture: an ``nn.Identity`` call (timm's disabled drop path...), drawn as the
    edge through it, and a dense parameter read (a norm's weight: graph.txt lists it)."""
    if node.op == "get_attr":
        return node.target.rpartition(".")[2] not in ("codebooks", "codes")
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity) and \
        len(node.all_input_nodes) == 1


def _dot_graph(gm: fx.GraphModule, name: str):
    """``gm``'s graph as a ``pydot.Dot``: each RPQ op boxed in orange with its codebooks and codes;
    a block repeated N times (``blocks.0`` .. ``blocks.11``) drawn once in a box saying "x12";
    ``nn.Identity`` calls left out."""
    pydot = require("pydot", "graph", "export_graph")
    representative, runs = collapse(gm)
    owner = owners(gm)
    dot = pydot.Dot(graph_type="digraph", rankdir="TB", fontname=FONT, nodesep="0.25", ranksep="0.3")
    dot.set_node_defaults(shape="box", style='"rounded,filled"', fillcolor="white", fontname=FONT, fontsize="11",
                          margin='"0.15,0.06"')
    dot.set_edge_defaults(color="#495057", arrowsize="0.6")

    def shown(node: fx.Node) -> fx.Node | None:
        while _hidden(gm, node):
            if not node.all_input_nodes:
                return None
            node = node.all_input_nodes[0]
        return representative[node]

    kept = [n for n in gm.graph.nodes if representative[n] is n and not _hidden(gm, n)]
    nodes = {n: pydot.Node(n.name, label=f'"{_node_label(gm, n)}"') for n in kept}
    run_of = {run.member(run.first): run for run in runs}
    edges = set()
    for copy in gm.graph.nodes:
        node = representative[copy]
        if node not in nodes:
            continue
        for source in copy.all_input_nodes:
            drawn = shown(source)
            between_copies = any(member_of(owner[source], run) not in (None, member_of(owner[copy], run))
                                 and member_of(owner[copy], run) is not None for run in runs)
            # an edge from one copy to the next is inside the one copy drawn
            if drawn is not None and drawn is not node and not between_copies:
                edges.add((drawn.name, node.name))
    for source, target in sorted(edges):
        dot.add_edge(pydot.Edge(source, target))

    def container(path: str) -> str | None:
        """The first member of the innermost collapsed run holding ``path``, if any."""
        inside = [m for m in run_of if path == m or path.startswith(f"{m}.")]
        return max(inside, key=len) if inside else None

    clusters = {}
    for member, run in sorted(run_of.items(), key=lambda item: len(item[0])):
        clusters[member] = pydot.Cluster(f"repeat_{len(clusters)}", label=f'"{run.label}: x{run.count}, drawn once"',
                                         color='"#1c7ed6"', style='"rounded,dashed"', fontcolor='"#1c7ed6"',
                                         fontname=FONT, penwidth="1.5")
    placed = {}
    regions = [(label, [m for m in members if m in nodes]) for label, members in _regions(gm)]
    regions = [(label, members) for label, members in regions if members]
    for i, (label, members) in enumerate(regions):
        head, _, rest = label.partition(": ")
        text = f"{head}:\\n{rest}" if rest else head
        cluster = pydot.Cluster(f"rpq_{i}", label=f'"{text}"', color=CLUSTER_COLOR, style='"rounded,dashed"',
                                penwidth="2", fontcolor=CLUSTER_COLOR, fontname=FONT)
        for member in members:
            expansion = member.op == "call_function"  # the rpq_fx op (or its checkpoint call)
            nodes[member].set("fillcolor", f'"{EXPAND_COLOR if expansion else EXPAND_INPUT_COLOR}"')
            if expansion:
                nodes[member].set("penwidth", "2.5")
                nodes[member].set("color", f'"{CLUSTER_COLOR}"')
            cluster.add_node(nodes[member])
            placed[member] = True
        parent = container(owner[members[-1]])
        (clusters[parent] if parent else dot).add_subgraph(cluster)
    for node in kept:
        if node not in placed:
            parent = container(owner[node])
            (clusters[parent] if parent else dot).add_node(nodes[node])
    for member, cluster in clusters.items():
        outer = container(member.rpartition(".")[0])
        (clusters[outer] if outer and outer != member else dot).add_subgraph(cluster)
    mode = "train" if gm.training else "eval"
    converted = len(rpq_weights(gm))
    repeats = (f"; {len(runs)} repeated block{'' if len(runs) == 1 else 's'} drawn once "
               f"(blue box{'' if len(runs) == 1 else 'es'})") if runs else ""
    dot.set("label", f'"{name} ({mode} mode): {converted} RPQ weights, each read by an rpq_fx op in an orange box\\n'
                     f'(codebooks + uint8 codes -> weight, or computed from them directly){repeats}"')
    dot.set("labelloc", "t")
    return dot


def _dot_source(gm: fx.GraphModule, name: str) -> str:
    return _dot_graph(gm, name).to_string()


def _module_dot(model: nn.Module, name: str):
    """The whole model as its module tree, left to right: each layer with an RPQ weight in orange
    (its C, K, d), a run of alike blocks drawn once ("x12"), modules without weights left out."""
    pydot = require("pydot", "graph", "export_graph")
    runs = repeated_runs(model)
    later = {run.member(i) for run in runs for i in range(run.first + 1, run.last + 1)}
    dot = pydot.Dot(graph_type="digraph", rankdir="LR", fontname=FONT, nodesep="0.15", ranksep="0.5")
    dot.set_node_defaults(shape="box", style='"rounded,filled"', fillcolor="white", fontname=FONT, fontsize="11",
                          margin='"0.15,0.06"')
    dot.set_edge_defaults(color="#868e96", arrowsize="0.5")
    counts = {"layers": 0}

    def weighty(item: dict) -> bool:
        return bool(item["params"] or item["rpq"] or any(weighty(c) for c in item["children"]))

    def add(item: dict, parent: str | None) -> None:
        key = dot_key(item["path"]) or "root"
        lines = [item["name"] if not item["repeat"] else item["repeat"].partition(" (")[2].rstrip(")"), item["cls"]]
        rpq = [c["rpq"] for c in item["children"] if c["rpq"]]
        attributes = {}
        if rpq:
            lines.append(f"RPQ {rpq[0]}")
            attributes = dict(fillcolor=f'"{EXPAND_COLOR}"', color=f'"{CLUSTER_COLOR}"', penwidth="2")
            counts["layers"] += 1
        if item["repeat"]:
            lines.append(f"{item['repeat'].partition(' ')[0]}, drawn once")
            attributes.update(color='"#1c7ed6"', penwidth="2", style='"rounded,filled,dashed"')
        label = "\\n".join(line.replace("\\", "\\\\").replace('"', "'") for line in lines)  # reason: dot escapes
        dot.add_node(pydot.Node(key, label=f'"{label}"', **attributes))
        if parent is not None:
            dot.add_edge(pydot.Edge(parent, key))
        for child in item["children"]:
            if child["path"] not in later and not child["rpq"] and weighty(child):
                add(child, key)

    add(module_tree(model), None)
    converted = len(rpq_weights(model))
    dot.set("label", f'"{name}: the module tree ({converted} RPQ weights; layers holding one in orange;\\n'
                     f'{len(runs)} run{"" if len(runs) == 1 else "s"} of alike blocks drawn once, in dashed blue; '
                     'modules without weights left out)"')
    dot.set("labelloc", "t")
    return dot


def draw_graph(gm: fx.GraphModule, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``graph.svg`` of ``gm`` into ``out_dir`` (or ``graph.dot`` and a warning, without Graphviz)."""
    return _render(_dot_source(gm, name or type(gm).__name__), Path(out_dir))


def _render(source: str, out: Path) -> Path:
    """``source`` drawn as ``out/graph.svg``; ``out/graph.dot`` and a warning (once) where no renderer can."""
    global _warned
    out.mkdir(parents=True, exist_ok=True)
    renderer = find_renderer()
    problem = "no Graphviz renderer found (pip install graphviz-pure, or install Graphviz's dot)"
    if renderer is not None:
        try:
            done = subprocess.run([renderer, "-Tsvg"], input=source.encode(), capture_output=True,
                                  timeout=RENDER_TIMEOUT_S, check=False)
            if done.returncode == 0 and done.stdout:
                (out / "graph.dot").unlink(missing_ok=True)
                svg = out / "graph.svg"
                svg.write_bytes(done.stdout)
                return svg
            problem = f"{renderer} failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()[:300]}"
        except subprocess.TimeoutExpired:
            problem = f"{renderer} took longer than {RENDER_TIMEOUT_S} s"
        except OSError as error:
            problem = f"{renderer} could not run: {error}"
    path = out / "graph.dot"
    path.write_text(source)
    (out / "graph.svg").unlink(missing_ok=True)
    if not _warned:
        _warned = True
        warnings.warn(f"export_graph: {problem}; wrote graph.dot instead of graph.svg "
                      f"(render it with `dot -Tsvg graph.dot -o graph.svg`)", GraphvizMissingWarning, stacklevel=3)
    return path


def _export_one(gm: fx.GraphModule, out: Path, name: str, picture: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "code.py").write_text(gm.code)
    (out / "graph.txt").write_text(node_table(gm) + "\n")
    if picture:
        draw_graph(gm, out, name)


def _single_layer(gm: fx.GraphModule) -> bool:
    """A part that is one layer (a model converted in place): nothing but its RPQ op to draw."""
    inside = {n for _, members in _regions(gm) for n in members}
    return not [n for n in gm.graph.nodes if n.op.startswith("call") and n not in inside]


def _write_page(model: nn.Module, out: Path, title: str) -> None:
    """``graph.html``: the module tree beside ``out/graph.svg`` (zoomable), one self-contained file."""
    svg = out / "graph.svg"
    rep = report(model).to_dict()["totals"]
    summary = (f"{rep['converted']} of {rep['layers']} weights converted, {rep['ratio']:.2f}x smaller "
               f"(captured by {rep['path']}). Wheel: zoom; drag: move; click a module: mark its nodes.")
    picture = svg.read_text() if svg.exists() else ""
    (out / "graph.html").write_text(page(title, summary, module_tree(model), picture), encoding="utf-8")


def export_graph(model: nn.Module, out_dir: str | Path, *, picture: bool = True) -> Path:
    """Write the converted ``model`` out for reading: ``code.py``, ``graph.txt``, ``graph.svg`` (or
    ``graph.dot`` without Graphviz), ``graph.html``, ``report.md`` and ``report.json``; returns ``out_dir``.

    ``model`` is what :func:`rpq_fx.convert` returns, or any module with converted parts (a model
    converted in place): then ``graph.svg`` / ``graph.html`` show its module tree, each part gets a
    folder named after it and ``index.md`` lists them. ``picture=False`` skips the drawing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report(model)
    (out / "report.md").write_text(rep.to_markdown() + "\n")
    (out / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    if isinstance(model, fx.GraphModule):
        _export_one(model, out, type(model).__name__, picture)
        if picture:
            _write_page(model, out, type(model).__name__)
        return out
    parts = [(name, gm) for name, gm in graph_parts(model) if any(isinstance(m, RPQWeight) for m in gm.modules())]
    if not parts and not rpq_weights(model):
        raise TypeError(f"export_graph: {type(model).__name__} is not a converted model and holds no RPQ weight "
                        "(convert it with rpq_fx.convert first)")
    if picture:
        _render(_module_dot(model, type(model).__name__).to_string(), out)
        _write_page(model, out, type(model).__name__)
    drawn_whole = next((f.name for f in out.glob("graph.*") if f.suffix in (".svg", ".dot")), None)
    lines = [f"# {type(model).__name__}: {len(rpq_weights(model))} RPQ weights, {len(parts)} converted graph parts", "",
             *([f"The whole model: [{drawn_whole}]({drawn_whole}), interactive: [graph.html](graph.html)", ""]
               if drawn_whole else []),
             *(["| part | class | RPQ weights | graph | code |", "|---|---|---|---|---|"] if parts else [])]
    for name, gm in parts:
        _export_one(gm, out / name, f"{type(model).__name__}.{name}", picture and not _single_layer(gm))
        count = len(rpq_weights(gm))
        drawn = next((f.name for f in (out / name).glob("graph.*") if f.suffix in (".svg", ".dot")), None)
        graph = f"[{drawn}]({name}/{drawn})" if drawn else "-"
        lines.append(f"| `{name}` | {type(gm).__name__} | {count} | {graph} | [code.py]({name}/code.py) |")
    lines += ["", "Size report: [report.md](report.md)", ""]
    (out / "index.md").write_text("\n".join(lines))
    return out
