"""``graph.html``: one self-contained page (no network: styles, script, data and picture inline) with
the module hierarchy as a tree beside the picture, which zooms (wheel, buttons) and pans (drag).
Clicking a module marks its nodes in the picture; ``graph.html#select=PATH`` opens with PATH marked.
"""

import html
import json

from torch import nn

from ._graph_view import repeated_runs
from .nn.weight import RPQWeight

__all__ = ["module_tree", "page", "dot_key"]


def dot_key(path: str) -> str:
    """The prefix of the picture's node names for the module ``path`` (fx names its nodes so)."""
    return path.replace(".", "_")


def module_tree(model: nn.Module) -> dict:
    """``{name, path, cls, rpq, params, repeat, drawn, children}`` for ``model`` and every submodule;
    ``rpq`` describes an RPQ weight ("768x768, C=12 K=256 d=64"); ``repeat`` ("x12") marks the first
    member of a run of alike blocks; ``drawn`` is the path the picture shows a module under (inside a
    later copy of a block, the same module of the first copy)."""
    runs = repeated_runs(model)
    repeats = {run.member(run.first): run for run in runs}
    copies = {run.member(i): run.member(run.first) for run in runs for i in range(run.first + 1, run.last + 1)}

    def drawn(path: str) -> str:
        for copy, first in copies.items():
            if path == copy or path.startswith(f"{copy}."):
                return drawn(first + path[len(copy):])
        return path

    def node(name: str, path: str, module: nn.Module) -> dict:
        item = {"name": name or "(model)", "path": path, "cls": type(module).__name__,
                "params": sum(p.numel() for p in module.parameters(recurse=False)), "rpq": None, "repeat": None,
                "drawn": drawn(path),
                "children": [node(child, f"{path}.{child}" if path else child, sub)
                             for child, sub in module.named_children()]}
        if isinstance(module, RPQWeight):
            item["rpq"] = (f"{'x'.join(map(str, module.shape))}, C={module.num_codebooks} K={module.num_codes} "
                           f"d={module.codebook_dim}")
        if path in repeats:
            item["repeat"] = f"x{repeats[path].count} ({repeats[path].label})"
        return item

    return node("", "", model)


_STYLE = """
body{margin:0;font:13px Helvetica,Arial,sans-serif;display:flex;flex-direction:column;height:100vh}
header{padding:6px 10px;border-bottom:1px solid #ccc}
header h1{font-size:15px;margin:0 0 2px 0}
main{flex:1;display:flex;min-height:0}
#tree{width:32%;min-width:220px;overflow:auto;border-right:1px solid #ccc;padding:4px}
#tree ul{list-style:none;margin:0;padding-left:14px}
#tree li>span{cursor:pointer;white-space:nowrap}
#tree li>span:hover{background:#e7f5ff}
#tree li.selected>span{background:#ffd8a8}
.cls{color:#868e96}.rpq{color:#d9480f;font-weight:bold}.repeat{color:#1c7ed6}
.toggle{display:inline-block;width:12px;color:#868e96}
#view{flex:1;overflow:hidden;position:relative;cursor:grab;background:#fff}
#view svg{position:absolute;left:0;top:0;transform-origin:0 0}
#controls{position:absolute;right:8px;top:8px;z-index:2}
#controls button{font-size:14px;width:28px;height:28px}
g.node.hit>path,g.node.hit>polygon,g.node.hit>ellipse{stroke:#e03131!important;stroke-width:4px}
"""

_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('rpq-tree').textContent);
  const tree = document.getElementById('tree'), view = document.getElementById('view');
  const svg = view.querySelector('svg');
  let scale = 1, x = 0, y = 0, modules = 0, weights = 0;
  const apply = () => { svg.style.transform = `translate(${x}px,${y}px) scale(${scale})`; };
  const size = () => { const b = svg.viewBox.baseVal; return b && b.width ? [b.width, b.height] : [svg.width.baseVal.value, svg.height.baseVal.value]; };
  function fit() {
    const [w, h] = size(); const r = view.getBoundingClientRect();
    svg.setAttribute('width', w); svg.setAttribute('height', h);
    scale = Math.min(r.width / w, r.height / h) || 1; x = (r.width - w * scale) / 2; y = 0; apply();
  }
  function zoom(f, cx, cy) { x = cx - (cx - x) * f; y = cy - (cy - y) * f; scale *= f; apply(); }
  view.addEventListener('wheel', e => { e.preventDefault(); const r = view.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top); }, {passive: false});
  let drag = null;
  view.addEventListener('mousedown', e => { drag = [e.clientX - x, e.clientY - y]; view.style.cursor = 'grabbing'; });
  window.addEventListener('mouseup', () => { drag = null; view.style.cursor = 'grab'; });
  window.addEventListener('mousemove', e => { if (drag) { x = e.clientX - drag[0]; y = e.clientY - drag[1]; apply(); } });
  document.getElementById('zoom-in').onclick = () => { const r = view.getBoundingClientRect(); zoom(1.5, r.width / 2, r.height / 2); };
  document.getElementById('zoom-out').onclick = () => { const r = view.getBoundingClientRect(); zoom(1 / 1.5, r.width / 2, r.height / 2); };
  document.getElementById('zoom-fit').onclick = fit;

  function select(path, li, drawn) {
    tree.querySelectorAll('li.selected').forEach(e => e.classList.remove('selected'));
    svg.querySelectorAll('g.node.hit').forEach(e => e.classList.remove('hit'));
    if (li) { li.classList.add('selected');
      for (let up = li.parentElement; up && up !== tree; up = up.parentElement) if (up.tagName === 'UL') up.style.display = ''; }
    const key = (drawn === undefined ? path : drawn).split('.').join('_');
    const hits = [...svg.querySelectorAll('g.node')].filter(g => {
      const t = (g.querySelector('title') || {}).textContent || '';
      return path === '' || t === key || t.startsWith(key + '_');
    });
    hits.forEach(g => g.classList.add('hit'));
    if (hits.length && path) {
      const h = hits[0].getBoundingClientRect(), s = svg.getBoundingClientRect(), r = view.getBoundingClientRect();
      const px = (h.left - s.left) / scale, py = (h.top - s.top) / scale;
      scale = Math.max(scale, 0.8); x = r.width / 2 - px * scale; y = r.height / 3 - py * scale; apply();
    }
    document.getElementById('status').textContent =
      `${modules} modules, ${weights} RPQ weights` + (path ? `; ${path}: ${hits.length} nodes marked` : '') +
      (path && drawn && drawn !== path ? ` (drawn once, as ${drawn})` : '');
    return hits.length;
  }

  function build(item, parent) {
    modules += 1; if (item.rpq) weights += 1;
    const li = document.createElement('li'); li.dataset.path = item.path; li.dataset.drawn = item.drawn;
    li.className = 'module' + (item.rpq ? ' rpq-weight' : '');
    const label = document.createElement('span');
    const toggle = document.createElement('span'); toggle.className = 'toggle';
    toggle.textContent = item.children.length ? '\u25be' : ''; label.appendChild(toggle);
    label.appendChild(document.createTextNode(item.name + ' '));
    const cls = document.createElement('span'); cls.className = 'cls'; cls.textContent = item.cls; label.appendChild(cls);
    if (item.rpq) { const r = document.createElement('span'); r.className = 'rpq'; r.textContent = ' RPQ ' + item.rpq; label.appendChild(r); }
    if (item.repeat) { const r = document.createElement('span'); r.className = 'repeat'; r.textContent = ' ' + item.repeat; label.appendChild(r); }
    li.appendChild(label); parent.appendChild(li);
    if (item.children.length) {
      const ul = document.createElement('ul'); li.appendChild(ul);
      item.children.forEach(c => build(c, ul));
      toggle.onclick = e => { e.stopPropagation(); const open = ul.style.display !== 'none';
        ul.style.display = open ? 'none' : ''; toggle.textContent = open ? '\u25b8' : '\u25be'; };
      if (item.path.split('.').length > 2) toggle.onclick({stopPropagation() {}});
    }
    label.onclick = () => select(item.path, li, item.drawn);
  }
  const root = document.createElement('ul'); tree.appendChild(root); build(data, root);
  fit();
  const wanted = new URLSearchParams(location.hash.slice(1)).get('select');
  const li = wanted !== null ? tree.querySelector(`li[data-path="${CSS.escape(wanted)}"]`) : null;
  select(li ? wanted : '', li, li ? li.dataset.drawn : undefined);
  document.body.dataset.ready = 'yes';
})();
"""


def page(title: str, summary: str, tree: dict, svg: str) -> str:
    """The page: ``title``, a ``summary`` line, the module ``tree`` (see :func:`module_tree`) and ``svg``
    (Graphviz output; its XML prologue is dropped)."""
    svg = svg[svg.index("<svg"):] if "<svg" in svg else '<svg xmlns="http://www.w3.org/2000/svg"></svg>'
    data = json.dumps(tree).replace("</", "<\\/")  # reason: a module name must not end the <script> element
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body>'
            f'<header><h1>{html.escape(title)}</h1><div>{html.escape(summary)}</div><div id="status"></div></header>'
            f'<main><nav id="tree"></nav><div id="view"><div id="controls"><button id="zoom-in">+</button>'
            f'<button id="zoom-out">&minus;</button><button id="zoom-fit">&#x2922;</button></div>{svg}</div></main>'
            f'<script type="application/json" id="rpq-tree">{data}</script><script>{_SCRIPT}</script></body></html>\n')
