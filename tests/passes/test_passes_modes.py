"""Train/eval mode: fx bakes ``if self.training:`` into the graph, so a converted model keeps one
graph per mode and ``.train()`` / ``.eval()`` switch them, as they switch the original."""

import copy

import pytest
import timm
import torch
from torch import nn

import rpq_fx
from rpq_fx.graph_module import graphs_of


class ModeBranch(nn.Module):
    """Computes something else in training (a deterministic stand-in for drop path)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 512)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.training:
            h = h * 3 - 1
        return self.fc2(h)


class EvalOnlyTraceable(ModeBranch):
    def forward(self, x):
        if self.training:
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                return self.fc2(self.fc1(x))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("convert_in_training", [True, False])
def test_both_modes_match_the_dense_reference_whichever_mode_converted_in(check, convert_in_training):
    model = ModeBranch().train(convert_in_training)
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert len(graphs_of(gm)) == 2
    assert gm.training == convert_in_training
    reference = check.dense_reference(model, gm)
    x = torch.randn(4, 64)
    for training in (True, False, convert_in_training):
        gm.train(training)
        reference.train(training)
        with torch.no_grad():
            check.outputs_close(gm(x), reference(x))
    assert not torch.allclose(gm.train()(x), gm.eval()(x)), "the two modes must differ for this model"


def test_mode_independent_model_keeps_one_graph():
    gm = rpq_fx.convert(nn.Sequential(nn.Linear(64, 512), nn.Dropout(0.5), nn.Linear(512, 512)).train(),
                        codebook_dim=16)
    assert graphs_of(gm) == [gm.graph]
    assert "rpq_mode_graphs" not in gm.meta
    gm.eval()
    x = torch.randn(2, 64)
    torch.testing.assert_close(gm(x), gm(x))  # dropout (a leaf module) follows the mode by itself


def test_conversion_restores_every_module_flag_of_the_input():
    model = ModeBranch().train()
    model.fc2.eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    rpq_fx.convert(model, codebook_dim=16)
    assert [m.training for m in model.modules()] == flags


def test_mode_that_cannot_be_traced_is_refused_when_switched_to():
    gm = rpq_fx.convert(EvalOnlyTraceable().eval(), codebook_dim=16)
    gm(torch.randn(2, 64))
    with pytest.raises(rpq_fx.RPQConversionError, match="converted in eval mode.*cannot trace it"):
        gm.train()


def test_deepcopy_keeps_both_graphs_and_the_record(check):
    model = ModeBranch().train()
    gm = copy.deepcopy(rpq_fx.convert(model, codebook_dim=16))
    assert len(graphs_of(gm)) == 2 and gm.rpq_layers and gm.rpq_config is not None
    reference = check.dense_reference(model, gm).eval()
    x = torch.randn(4, 64)
    with torch.no_grad():
        check.outputs_close(gm.eval()(x), reference(x))


def test_checkpoint_wraps_the_expansions_of_both_graphs():
    gm = rpq_fx.convert(ModeBranch().train(), codebook_dim=16, checkpoint=True)
    for graph in graphs_of(gm):
        assert not [n for n in graph.nodes if n.target is torch.ops.rpq_fx.expand.default]
        # reason: a linear layer is fused into rpq_fx::linear (no dense weight to checkpoint) or else checkpointed
        assert sum(n.target in (torch.utils.checkpoint.checkpoint, torch.ops.rpq_fx.linear.default)
                   for n in graph.nodes) == 2


def test_timm_swin_with_drop_path_converted_in_train_mode_evaluates_like_the_original(check):
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, drop_path_rate=0.1).train()
    gm = rpq_fx.RPQ(model)
    assert len(graphs_of(gm)) == 2
    reference = check.dense_reference(model, gm).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        check.outputs_close(gm.eval()(x), reference(x))
