"""``export_graph``: write a converted model out for a person to read.

For a converted GraphModule: ``code.py`` (the generated forward), ``graph.txt`` (the node table),
``graph.svg`` (the graph drawn by torch.fx's ``FxGraphDrawer`` and Graphviz, each RPQ expansion
in an orange box: codebooks + codes -> ``rpq_fx::expand`` -> the op that reads the weight, or
codebooks + codes -> a compressed-domain ``rpq_fx::linear`` / ``rpq_fx::embedding``), and
``report.md`` / ``report.json``. Where no Graphviz renderer is found, ``graph.dot`` is written
instead and a warning says so, once per process.

The renderer is, in this order: the program named by ``$RPQ_FX_DOT``; ``graphviz-pure`` (a
self-contained port of Graphviz's ``dot``, installed by the ``graph`` extra); Graphviz's own ``dot``.

For a model with converted parts (``model.backbone = rpq_fx.convert(model.backbone, ...)``), each
converted GraphModule gets its own folder with the files above, and ``index.md`` links them.
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


def _quote(name: str) -> str:
    return name.strip('"')


def _dot_graph(gm: fx.GraphModule, name: str):
    """``gm``'s graph as a ``pydot.Dot`` (FxGraphDrawer), each RPQ expansion boxed in orange."""
    pydot = require("pydot", "graph", "export_graph")
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    dot = FxGraphDrawer(gm, name).get_main_dot_graph()
    nodes = {_quote(n.get_name()): n for n in dot.get_nodes()}
    regions = _regions(gm)
    for i, (label, members) in enumerate(regions):
        cluster = pydot.Cluster(f"rpq_{i}", label=f'"{label}"', color=CLUSTER_COLOR, style='"rounded,dashed"',
                                penwidth="2", fontcolor=CLUSTER_COLOR, fontname="Helvetica")
        for member in members:
            node = nodes.get(member.name)
            if node is None:
                continue
            expansion = member.op == "call_function"  # the rpq_fx op (or its checkpoint call)
            node.set("fillcolor", f'"{EXPAND_COLOR if expansion else EXPAND_INPUT_COLOR}"')
            if expansion:
                node.set("penwidth", "2.5")
                node.set("color", f'"{CLUSTER_COLOR}"')
            dot.del_node(node.get_name())
            cluster.add_node(node)
        dot.add_subgraph(cluster)
    mode = "train" if gm.training else "eval"
    converted = len(rpq_weights(gm))
    dot.set("label", f'"{name} ({mode} mode): {converted} RPQ weights, read by the {len(regions)} rpq_fx ops in '
                     f'orange boxes (codebooks + uint8 codes -> weight, or computed from them directly)"')
    dot.set("labelloc", "t")
    dot.set("fontname", "Helvetica")
    return dot


def _dot_source(gm: fx.GraphModule, name: str) -> str:
    return _dot_graph(gm, name).to_string()


def draw_graph(gm: fx.GraphModule, out_dir: str | Path, name: str | None = None) -> Path:
    """Write ``graph.svg`` of ``gm`` into ``out_dir`` (or ``graph.dot`` and a warning, without Graphviz)."""
    global _warned
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = _dot_source(gm, name or type(gm).__name__)
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


def export_graph(model: nn.Module, out_dir: str | Path, *, picture: bool = True) -> Path:
    """Write the converted ``model`` out for reading: ``code.py``, ``graph.txt``, ``graph.svg`` (or
    ``graph.dot`` without Graphviz), ``report.md`` and ``report.json``; returns ``out_dir``.

    ``model`` is what :func:`rpq_fx.convert` returns, or any module with converted parts: then each
    part gets a folder named after it and ``index.md`` lists them. ``picture=False`` skips the drawing
    (large graphs take a while to lay out).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report(model)
    (out / "report.md").write_text(rep.to_markdown() + "\n")
    (out / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    if isinstance(model, fx.GraphModule):
        _export_one(model, out, type(model).__name__, picture)
        return out
    parts = [(name, gm) for name, gm in graph_parts(model) if any(isinstance(m, RPQWeight) for m in gm.modules())]
    if not parts:
        raise TypeError(f"export_graph: {type(model).__name__} is not a converted model and holds no converted "
                        "part (a GraphModule returned by rpq_fx.convert)")
    lines = [f"# {type(model).__name__}: {len(parts)} converted parts", "",
             "| part | class | RPQ weights | graph | code |", "|---|---|---|---|---|"]
    for name, gm in parts:
        _export_one(gm, out / name, f"{type(model).__name__}.{name}", picture)
        count = len(rpq_weights(gm))
        drawn = next((f.name for f in (out / name).glob("graph.*") if f.suffix in (".svg", ".dot")), None)
        graph = f"[{drawn}]({name}/{drawn})" if drawn else "-"
        lines.append(f"| `{name}` | {type(gm).__name__} | {count} | {graph} | [code.py]({name}/code.py) |")
    lines += ["", "Size report: [report.md](report.md)", ""]
    (out / "index.md").write_text("\n".join(lines))
    return out
