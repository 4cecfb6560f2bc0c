"""``RPQGraphModule``: what ``convert`` returns, a GraphModule that remembers its conversion.

fx bakes ``if self.training:`` branches (drop path, stochastic depth) into the traced graph. When
a model traces differently in train and eval mode, the converted model keeps one graph per mode,
over one set of modules, and ``.train()`` / ``.eval()`` switch between them, as they would switch
the original's behaviour. The conversion record (:mod:`rpq_fx.record`) lives in ``meta``; both
survive ``copy.deepcopy``, pickling and ``torch.save``.
"""

import torch.fx as fx
from torch import nn

from .errors import RPQConversionError
from .nn.layers import RPQ_LAYERS
from .ops import hot_embedding
from .record import conversion_record

__all__ = ["RPQGraphModule", "graphs_of", "graph_parts"]

_MODE_GRAPHS = "rpq_mode_graphs"


def graphs_of(gm: fx.GraphModule) -> list[fx.Graph]:
    """Every graph of ``gm``: the current one first, then the other mode's, if it has one."""
    return list(dict.fromkeys([gm.graph, *gm.meta.get(_MODE_GRAPHS, {}).values()]))


_RPQ_LAYER_TYPES = tuple(RPQ_LAYERS.values())


def _traced(layer: nn.Module) -> fx.GraphModule:
    """An RPQ layer's forward as a graph over its own tensors (what the layer computes, as the
    rewrite pass would have written it for the dense layer it replaced)."""
    graph = fx.Tracer(autowrap_functions=(hot_embedding,)).trace(layer)
    return fx.GraphModule(layer, graph, type(layer).__name__)


def graph_parts(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """``[("", model)]`` for a GraphModule; else, with their names, the outermost GraphModules inside
    ``model`` (the rewritten layers of a model converted in place) and its RPQ layers (``RPQLinear``
    ...), each traced into a GraphModule that shares its tensors."""
    if isinstance(model, fx.GraphModule):
        return [("", model)]
    parts: list[tuple[str, fx.GraphModule]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{p}.") for p, _ in parts):
            continue
        if isinstance(module, fx.GraphModule):
            parts.append((name, module))
        elif isinstance(module, _RPQ_LAYER_TYPES):
            parts.append((name, _traced(module)))
    return parts


def _rebuild(reduce, body: dict, rest: tuple, meta: dict, codes: dict[bool, str], class_name: str) -> "RPQGraphModule":
    """Unpickle an :class:`RPQGraphModule`: each mode's graph traced again from its generated code by
    fx's own rebuild (``reduce``), over one module holding every submodule, tensor and attribute of
    the pickled one (fx's rebuild alone keeps only those its one graph names), then ``meta``."""
    graphs = {mode: reduce({**body, "_code": code}, *rest).graph for mode, code in codes.items()}
    holder = nn.Module()
    vars(holder).update(body)
    result = RPQGraphModule(holder, graphs[body["training"]], class_name)
    for slot in ("_modules", "_parameters", "_buffers"):  # the pickled objects, not fx's placeholder modules
        getattr(result, slot).update(body[slot])
    for name, value in body.items():
        vars(result).setdefault(name, value)
    result.meta.update(meta)
    if len(graphs) > 1:
        result.meta[_MODE_GRAPHS] = graphs
    return result


class RPQGraphModule(fx.GraphModule):
    """A GraphModule with the conversion record in ``meta`` (kept by ``copy.deepcopy`` and pickling)."""

    @property
    def rpq_layers(self) -> list:
        """One ``LayerPlan`` per weight: how it was converted, or why it stayed dense (a view of
        :func:`rpq_fx.conversion_record`)."""
        record = conversion_record(self)
        return list(record.layers) if record else []

    @property
    def rpq_config(self):
        """The ``RPQConfig`` the model was converted with (a view of the conversion record)."""
        record = conversion_record(self)
        return record.config if record else None

    @property
    def rpq_path(self) -> str | None:
        """How the model was captured: ``"torch.fx"`` or ``"torch.export"`` (a view of the conversion record)."""
        record = conversion_record(self)
        return record.path if record else None

    def __reduce__(self):
        """Pickled as fx pickles a GraphModule (its modules, tensors and generated code), plus
        ``meta`` and the other mode's code: fx's own pickling keeps neither, nor this class."""
        reduce, (body, *rest) = super().__reduce__()[:2]
        body = {k: v for k, v in body.items() if k != "meta"}
        graphs = self.meta.get(_MODE_GRAPHS) or {self.training: self.graph}
        codes = {mode: graph.python_code("self").src for mode, graph in graphs.items()}
        meta = {k: v for k, v in self.meta.items() if k != _MODE_GRAPHS}
        return _rebuild, (reduce, body, tuple(rest), meta, codes, type(self).__name__)

    def train(self, mode: bool = True) -> "RPQGraphModule":
        super().train(mode)
        unavailable = self.meta.get("rpq_untraced_mode")
        if unavailable is not None and unavailable[0] == mode:
            raise RPQConversionError(unavailable[1])
        graph = self.meta.get(_MODE_GRAPHS, {}).get(mode)
        if graph is not None and graph is not self.graph:
            self.graph = graph  # the setter regenerates forward()
        return self
