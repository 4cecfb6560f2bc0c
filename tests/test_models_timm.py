"""The model sweep: converted timm models against the dense reference built from their decompressed weights."""

import copy

import pytest
import torch
from torch import nn

from conftest import codebook_gradient
import rpq_fx

timm = pytest.importorskip("timm")

MODELS = ["resnet18", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
          "mobilenetv3_small_100", "swin_tiny_patch4_window7_224"]


def _calibrate_batchnorm(model: nn.Module) -> None:
    """Set BN running statistics from one batch, so that eval-mode outputs of a random-init net are not ~0.

    (efficientnet / mobilenetv3 at init, with running_var = 1, shrink activations block after block.)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1)))


def _make(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    _calibrate_batchnorm(model)
    # eval before converting: fx bakes `if self.training` branches (DropPath, ...) into the graph
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_matches_dense_reference(name, images, check):
    model = _make(name)
    dense_size = rpq_fx.model_size(model)
    weights = sum(1 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))

    # RPQ defaults: only layers that shrink, never a bigger model
    gm = rpq_fx.RPQ(model)
    rep = rpq_fx.report(gm)
    assert rep.totals["converted"] >= 6
    assert all(r["bytes after"] <= r["bytes before"] for r in rep.rows)
    assert rpq_fx.model_size(gm) < dense_size
    check.matches_dense_reference(model, gm, images)

    # small codebooks: nearly every linear / conv weight converts (depthwise, grouped, strided, 1x1 ...)
    gm = rpq_fx.RPQ(model, num_codes=16)
    rep = rpq_fx.report(gm)
    assert rep.totals["converted"] >= 0.85 * weights, (rep.totals, weights)
    assert "torch.ops.rpq_fx.expand" in gm.code
    check.matches_dense_reference(model, gm, images)


def test_timm_checkpointed_backward_matches_dense_reference(images, check):
    model = _make("convnext_atto")
    gm = rpq_fx.RPQ(model, num_codes=32, checkpoint=True)
    assert "torch.utils.checkpoint.checkpoint" in gm.code and "rpq_fx.expand" not in gm.code
    reference = check.dense_reference(model, gm)
    x = images[:1].clone().requires_grad_()
    x_ref = images[:1].clone().requires_grad_()
    out, out_ref = gm(x), reference(x_ref)
    check.outputs_close(out, out_ref)
    weight = torch.linspace(-1, 1, out.shape[-1])
    (out * weight).sum().backward()
    (out_ref * weight).sum().backward()
    scale = x_ref.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5 * scale)

    # each codebook gradient is the dense reference's weight gradient summed over the rows that use each codeword
    checked = 0
    for name in check.converted_names(gm):
        rpq = gm.get_submodule(name)
        expected = codebook_gradient(reference.get_parameter(name).grad, rpq.codes, rpq.codebooks.shape[0],
                                     rpq.num_codes)
        grad_scale = expected.abs().max().item()
        torch.testing.assert_close(rpq.codebooks.grad, expected, rtol=1e-4, atol=1e-5 * grad_scale, msg=name)
        checked += 1
    assert checked >= 20

    # the leftovers' gradients (norms, biases) agree too
    for pname, param in gm.named_parameters():
        if pname.endswith("codebooks") or param.grad is None:
            continue
        ref_grad = reference.get_parameter(pname).grad
        torch.testing.assert_close(param.grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item() + 1e-12,
                                   msg=pname)


def test_timm_inplace_conversion_matches_reference(images, check):
    model = _make("resnet18")
    original = copy.deepcopy(model)
    gm = rpq_fx.RPQ(model, num_codes=16, inplace=True)
    assert not any(n in dict(model.named_parameters()) for n in check.converted_names(gm))
    check.matches_dense_reference(original, gm, images)
