"""``export_graph``: write a converted model out for a person to read."""

import json
from pathlib import Path

import torch.fx as fx
from tabulate import tabulate

from .report import report

__all__ = ["export_graph"]


def node_table(gm: fx.GraphModule) -> str:
    """One row per node (opcode, name, target, args, kwargs), as ``Graph.print_tabular`` but returned."""
    rows = [[n.op, n.name, getattr(n.target, "__name__", n.target) if n.op == "call_function" else n.target,
             n.args, n.kwargs] for n in gm.graph.nodes]
    return tabulate(rows, headers=["opcode", "name", "target", "args", "kwargs"])


def export_graph(model: fx.GraphModule, out_dir: str | Path) -> Path:
    """Write ``code.py`` (generated code), ``graph.txt`` (node table), ``report.md`` and ``report.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = report(model)
    (out / "code.py").write_text(model.code)
    (out / "graph.txt").write_text(node_table(model) + "\n")
    (out / "report.md").write_text(rep.to_markdown() + "\n")
    (out / "report.json").write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return out
