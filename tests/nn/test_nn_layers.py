"""The eager RPQ layers against the torch layers holding the same (expanded) dense weight."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import LargestTensor
from rpq_fx.nn import RPQConv1d, RPQConv2d, RPQConv3d, RPQEmbedding, RPQLinear, RPQWeight


def unsigned(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int64) & 0xFFFF if codes.dtype == torch.int16 else codes.to(torch.int64)


def reference_expand(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    u = unsigned(codes)
    return torch.cat([codebooks[0 if codebooks.shape[0] == 1 else c, u[c]] for c in range(u.shape[0])], dim=1)


def copy_into_dense(rpq: nn.Module, dense: nn.Module) -> None:
    with torch.no_grad():
        assert dense.weight.shape == rpq.weight().shape
        dense.weight.copy_(rpq.weight())
        if getattr(rpq, "bias", None) is None:
            assert getattr(dense, "bias", None) is None
        else:
            dense.bias.copy_(rpq.bias)


def check_against_dense(rpq: nn.Module, dense: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    """Same output, same input gradient, and codebook/bias gradients equal to the dense ones
    pulled back through the (independent) reference expansion."""
    copy_into_dense(rpq, dense)
    x_rpq = x.clone().requires_grad_(x.is_floating_point())
    x_ref = x.clone().requires_grad_(x.is_floating_point())
    out, ref = rpq(x_rpq), dense(x_ref)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad_out = torch.randn_like(ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    if x.is_floating_point():
        torch.testing.assert_close(x_rpq.grad, x_ref.grad, rtol=tol, atol=tol)
        assert x_rpq.grad.abs().sum() > 0
    weight = rpq.weight
    cb = weight.codebooks.detach().clone().requires_grad_()
    expanded = reference_expand(cb, weight.codes).view(dense.weight.shape)
    (cb_grad,) = torch.autograd.grad(expanded, cb, dense.weight.grad)
    torch.testing.assert_close(weight.codebooks.grad, cb_grad, rtol=tol, atol=tol)
    assert weight.codes.grad is None
    if getattr(rpq, "bias", None) is not None:
        torch.testing.assert_close(rpq.bias.grad, dense.bias.grad, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- Linear

@pytest.mark.parametrize("in_f,out_f,C,bias,K,shared,batch", [
    (16, 12, 4, True, 256, False, (5,)),
    (16, 12, 4, False, 16, False, (2, 3)),
    (18, 7, 3, True, 300, True, (4,)),
    (8, 40, 1, True, 2, False, (1, 1)),
    (24, 10, 24, True, 65536, False, (3,)),
])
def test_linear_matches_dense(in_f, out_f, C, bias, K, shared, batch):
    torch.manual_seed(0)
    rpq = RPQLinear(in_f, out_f, C, bias, num_codes=K, shared_codebooks=shared, dtype=torch.float64)
    assert rpq.weight.shape == (out_f, in_f)
    assert rpq.weight.num_codebooks == C and rpq.weight.codebook_dim == in_f // C
    assert rpq.weight.num_vectors == out_f
    assert (rpq.bias is None) == (not bias)
    dense = nn.Linear(in_f, out_f, bias, dtype=torch.float64)
    check_against_dense(rpq, dense, torch.randn(*batch, in_f, dtype=torch.float64))


def test_linear_float32():
    torch.manual_seed(1)
    rpq = RPQLinear(64, 32, 8)
    dense = nn.Linear(64, 32)
    check_against_dense(rpq, dense, torch.randn(6, 64), tol=1e-5)


def test_linear_reference_size_runs():
    layer = RPQLinear(1024, 1024, num_codebooks=16)
    assert layer.weight.codebooks.shape == (16, 256, 64)
    assert layer.weight.codes.shape == (16, 1024) and layer.weight.codes.dtype == torch.uint8
    x = torch.randn(1, 1, 1024)
    y = layer(x)
    assert y.shape == (1, 1, 1024)
    torch.testing.assert_close(y, F.linear(x, reference_expand(layer.weight.codebooks.detach(),
                                                                layer.weight.codes), layer.bias))


def test_linear_parameters_and_bias_init():
    layer = RPQLinear(256, 512, 4)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight.codebooks", "bias"}
    assert {name for name, _ in layer.named_buffers()} == {"weight.codes"}
    bound = 1 / 16
    bias = layer.bias.detach()
    assert float(bias.abs().max()) <= bound and float(bias.abs().max()) > 0.9 * bound
    assert "in_features=256" in repr(layer) and "out_features=512" in repr(layer)


# --------------------------------------------------------------------------- Embedding

@pytest.mark.parametrize("num,dim,C,padding_idx,K,shared", [
    (50, 8, 2, None, 256, False),
    (50, 8, 4, 3, 16, True),
    (300, 6, 3, -1, 300, False),
])
def test_embedding_matches_dense(num, dim, C, padding_idx, K, shared):
    torch.manual_seed(2)
    rpq = RPQEmbedding(num, dim, C, padding_idx, num_codes=K, shared_codebooks=shared, dtype=torch.float64)
    dense = nn.Embedding(num, dim, padding_idx, dtype=torch.float64)
    assert rpq.padding_idx == dense.padding_idx
    idx = torch.randint(0, num, (4, 9))
    if padding_idx is not None:
        idx[:, ::3] = dense.padding_idx
    check_against_dense(rpq, dense, idx)
    if padding_idx is not None:
        assert dense.weight.grad[dense.padding_idx].abs().sum() == 0


def test_embedding_positional_order():
    emb = RPQEmbedding(10, 8, 2, 3)
    assert emb.num_embeddings == 10 and emb.embedding_dim == 8
    assert emb.weight.num_codebooks == 2 and emb.weight.codebook_dim == 4
    assert emb.padding_idx == 3
    assert emb.weight.codebooks.shape == (2, 256, 4)
    assert emb(torch.tensor([[1, 9]])).shape == (1, 2, 8)
    assert RPQEmbedding(10, 8, 2, -1).padding_idx == 9
    assert RPQEmbedding(10, 8, 2).padding_idx is None


def test_embedding_init_is_standard_normal():
    emb = RPQEmbedding(1000, 64, 4, num_codes=1024)
    std = float(emb.weight.codebooks.detach().std())
    assert abs(std - 1) < 0.03


def test_embedding_padding_idx_gets_no_gradient():
    emb = RPQEmbedding(20, 6, 3, padding_idx=5, num_codes=8)
    emb(torch.full((3, 4), 5)).sum().backward()
    assert emb.weight.codebooks.grad is not None
    assert emb.weight.codebooks.grad.abs().sum() == 0
    # the same tokens with padding_idx=None do reach the codebooks
    emb.weight.codebooks.grad = None
    F.embedding(torch.full((3, 4), 5), emb.weight()).sum().backward()
    assert emb.weight.codebooks.grad.abs().sum() > 0
    # mixed input: the gradient equals the gradient of the non-padding tokens alone
    emb.weight.codebooks.grad = None
    emb(torch.tensor([[5, 1, 5, 2]])).square().sum().backward()
    mixed = emb.weight.codebooks.grad.clone()
    emb.weight.codebooks.grad = None
    emb(torch.tensor([[1, 2]])).square().sum().backward()
    torch.testing.assert_close(mixed, emb.weight.codebooks.grad)


@pytest.mark.parametrize("padding_idx", [10, 11, -11, -100])
def test_embedding_padding_idx_out_of_range(padding_idx):
    with pytest.raises(ValueError) as info:
        RPQEmbedding(10, 8, 2, padding_idx)
    assert "padding_idx" in str(info.value) and str(padding_idx) in str(info.value)


# --------------------------------------------------------------------------- Convolutions

CONV_CASES = [
    # (cls, dense cls, in, out, kernel, kwargs, num_codebooks, input spatial)
    (RPQConv1d, nn.Conv1d, 4, 6, 3, dict(stride=2, padding=1), 3, (11,)),
    (RPQConv1d, nn.Conv1d, 4, 8, 5, dict(padding="same", dilation=2, groups=2, padding_mode="reflect"), 5, (13,)),
    (RPQConv1d, nn.Conv1d, 3, 5, 4, dict(padding=2, padding_mode="circular", bias=False), 2, (9,)),
    (RPQConv2d, nn.Conv2d, 3, 8, 3, dict(), 3, (7, 6)),
    (RPQConv2d, nn.Conv2d, 4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), 4, (9, 8)),
    (RPQConv2d, nn.Conv2d, 4, 8, 3, dict(padding="same", padding_mode="reflect", groups=4), 9, (6, 7)),
    (RPQConv2d, nn.Conv2d, 6, 6, 3, dict(padding=1, padding_mode="circular", groups=3, bias=False), 2, (5, 5)),
    (RPQConv2d, nn.Conv2d, 2, 4, 2, dict(padding="same", padding_mode="replicate"), 8, (5, 4)),
    (RPQConv2d, nn.Conv2d, 8, 8, 1, dict(groups=8), 1, (4, 4)),
    (RPQConv3d, nn.Conv3d, 2, 4, 3, dict(stride=2, padding=1), 6, (5, 6, 5)),
    (RPQConv3d, nn.Conv3d, 4, 4, (1, 3, 3), dict(padding="same", padding_mode="circular", groups=2), 3, (3, 5, 4)),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
@pytest.mark.parametrize("shared", [False, True])
def test_conv_matches_dense(case, shared):
    cls, dense_cls, cin, cout, k, kwargs, C, spatial = CONV_CASES[case]
    torch.manual_seed(case)
    rpq = cls(cin, cout, k, **kwargs, num_codebooks=C, num_codes=16, shared_codebooks=shared,
              dtype=torch.float64)
    dense = dense_cls(cin, cout, k, **kwargs, dtype=torch.float64)
    assert isinstance(rpq, dense_cls)
    assert isinstance(rpq.weight, RPQWeight)
    assert rpq.weight.num_vectors == cout and rpq.weight.num_codebooks == C
    assert rpq.weight.shape == tuple(dense.weight.shape)
    assert {name for name, _ in rpq.named_parameters()} == (
        {"weight.codebooks", "bias"} if dense.bias is not None else {"weight.codebooks"})
    check_against_dense(rpq, dense, torch.randn(2, cin, *spatial, dtype=torch.float64))


def test_conv_float32_and_bias_init():
    torch.manual_seed(3)
    rpq = RPQConv2d(16, 32, 3, padding=1, num_codebooks=16)
    fan_in = 16 * 9
    assert float(rpq.bias.detach().abs().max()) <= fan_in ** -0.5
    assert rpq.bias.abs().sum() > 0
    assert float(rpq.weight().detach().abs().max()) <= fan_in ** -0.5
    check_against_dense(rpq, nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 8, 8), tol=1e-5)


def test_conv_on_meta_allocates_nothing():
    # on a real device this would be ~600 MB of dense weight; on meta nothing is allocated
    conv = RPQConv2d(4096, 4096, 3, num_codebooks=288, device="meta")
    assert conv.weight.codebooks.is_meta and conv.weight.codes.is_meta and conv.bias.is_meta
    assert conv.weight().shape == (4096, 4096, 3, 3)
    out = conv(torch.empty(1, 4096, 8, 8, device="meta"))
    assert out.is_meta and out.shape == (1, 4096, 6, 6)
    lin = RPQLinear(10**5, 10**5, 1000, device="meta")
    assert lin.weight.codes.is_meta and lin(torch.empty(2, 10**5, device="meta")).shape == (2, 10**5)


@pytest.mark.parametrize("make,dense_numel", [
    (lambda: RPQConv1d(64, 64, 9, num_codebooks=8, num_codes=16), 64 * 64 * 9),
    (lambda: RPQConv2d(64, 64, 3, num_codebooks=8, num_codes=16), 64 * 64 * 9),
    (lambda: RPQConv3d(32, 64, 3, num_codebooks=8, num_codes=16), 64 * 32 * 27),
    (lambda: RPQLinear(512, 256, 8, num_codes=16), 512 * 256),
    (lambda: RPQEmbedding(512, 256, 8, num_codes=16), 512 * 256),
])
def test_construction_never_allocates_the_dense_weight(make, dense_numel):
    with LargestTensor() as mode:
        layer = make()
    assert not layer.weight.codebooks.is_meta and not layer.weight.codes.is_meta
    assert 0 < mode.largest < dense_numel / 2


def test_conv_copy_and_pickle():
    conv = RPQConv2d(4, 8, 3, padding="same", padding_mode="reflect", num_codebooks=4)
    x = torch.randn(1, 4, 5, 5)
    clone = copy.deepcopy(conv)
    torch.testing.assert_close(clone(x), conv(x))
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is RPQConv2d
    torch.testing.assert_close(loaded(x), conv(x))
    fresh = RPQConv2d(4, 8, 3, padding="same", padding_mode="reflect", num_codebooks=4)
    fresh.load_state_dict(conv.state_dict())
    torch.testing.assert_close(fresh(x), conv(x))


# --------------------------------------------------------------------------- argument errors

@pytest.mark.parametrize("make,layer,value", [
    (lambda: RPQLinear(10, 4, 3), "RPQLinear", "3"),
    (lambda: RPQLinear(10, 4, 0), "RPQLinear", "0"),
    (lambda: RPQLinear(10, 4, -2), "RPQLinear", "-2"),
    (lambda: RPQLinear(10, 4, 2.0), "RPQLinear", "2.0"),
    (lambda: RPQLinear(10, 4, True), "RPQLinear", "True"),
    (lambda: RPQEmbedding(10, 10, 4), "RPQEmbedding", "4"),
    (lambda: RPQConv1d(3, 4, 3, num_codebooks=2), "RPQConv1d", "2"),
    (lambda: RPQConv2d(3, 4, 3, num_codebooks=5), "RPQConv2d", "5"),
    (lambda: RPQConv2d(4, 4, 3, groups=2, num_codebooks=4), "RPQConv2d", "4"),
    (lambda: RPQConv3d(2, 4, 2, num_codebooks=3), "RPQConv3d", "3"),
])
def test_indivisible_or_bad_num_codebooks_raises(make, layer, value):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert layer in message
    assert "num_codebooks" in message and value in message


def test_bad_num_codes_raises_from_layer():
    with pytest.raises(ValueError, match="num_codes.*65537"):
        RPQLinear(8, 4, 2, num_codes=65537)
    with pytest.raises(ValueError, match="num_codes.*1"):
        RPQConv2d(2, 4, 3, num_codebooks=2, num_codes=1)


# --------------------------------------------------------------------------- training

def test_training_loop_lowers_loss_and_keeps_codes():
    torch.manual_seed(0)
    layer = RPQLinear(32, 16, num_codebooks=4, num_codes=16)
    teacher = nn.Linear(32, 16)
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = teacher(x)
    codes_before = layer.weight.codes.clone()
    codebooks_before = layer.weight.codebooks.detach().clone()
    params = list(layer.parameters())
    assert len(params) == 2 and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(layer.weight.codes, codes_before)
    assert layer.weight.codes.dtype == torch.uint8
    assert not torch.equal(layer.weight.codebooks.detach(), codebooks_before)
    # the expanded weight still follows the formula with the trained codebooks
    torch.testing.assert_close(layer.weight(), reference_expand(layer.weight.codebooks.detach(), codes_before))
