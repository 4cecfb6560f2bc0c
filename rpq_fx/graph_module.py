"""``RPQGraphModule``: what ``convert`` returns, a GraphModule that remembers its conversion.

fx bakes ``if self.training:`` branches (drop path, stochastic depth) into the traced graph. When
a model traces differently in train and eval mode, the converted model keeps one graph per mode,
over one set of modules, and ``.train()`` / ``.eval()`` switch between them, as they would switch
the original's behaviour.
"""

import torch.fx as fx

from .errors import RPQConversionError

__all__ = ["RPQGraphModule", "graphs_of"]


def graphs_of(gm: fx.GraphModule) -> list[fx.Graph]:
    """Every graph of ``gm``: the current one first, then the other mode's, if it has one."""
    return list(dict.fromkeys([gm.graph, *gm.meta.get("rpq_mode_graphs", {}).values()]))


class RPQGraphModule(fx.GraphModule):
    """A GraphModule with the conversion record in ``meta`` (kept by ``copy.deepcopy``)."""

    @property
    def rpq_layers(self) -> list:
        """One ``LayerPlan`` per weight: how it was converted, or why it stayed dense."""
        return self.meta.get("rpq_layers", [])

    @property
    def rpq_config(self):
        """The ``RPQConfig`` the model was converted with."""
        return self.meta.get("rpq_config")

    @property
    def rpq_path(self) -> str | None:
        """How the model was captured: ``"torch.fx"`` or ``"torch.export"``."""
        return self.meta.get("rpq_path")

    def train(self, mode: bool = True) -> "RPQGraphModule":
        super().train(mode)
        unavailable = self.meta.get("rpq_untraced_mode")
        if unavailable is not None and unavailable[0] == mode:
            raise RPQConversionError(unavailable[1])
        graph = self.meta.get("rpq_mode_graphs", {}).get(mode)
        if graph is not None and graph is not self.graph:
            self.graph = graph  # the setter regenerates forward()
        return self
