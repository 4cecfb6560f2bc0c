"""The rpq_fx ops under ``torch.autocast``: cast as ``F.linear`` / ``F.embedding`` would, against a dense
reference built from the expanded weight, and AMP (bf16, CPU) training of converted ViT, ConvNeXt and Llama."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import rpq_fx
from conftest import codebook_gradient, dense_reference, make_case, reference_expand
from rpq_fx.ops import compute_path, embedding, expand, linear
from rpq_fx.ops.autocast import AUTOCAST_KEYS, AUTOCAST_RULES

BF16_EPS = 2.0 ** -8  # bfloat16's spacing at 1


def test_every_rpq_fx_op_has_an_autocast_rule():
    # reason: the dispatcher's list of registered op names has no public accessor
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("rpq_fx::")}
    # the C++ kernels' test hooks: _lut_split_hooks takes no tensors, _linear_lut_in_region only tests call
    names -= {"_lut_split_hooks", "_linear_lut_in_region"}
    assert {"linear", "expand", "embedding"} <= names
    assert names <= set(AUTOCAST_RULES), f"ops without an autocast rule: {sorted(names - set(AUTOCAST_RULES))}"
    for name in names:
        for key in AUTOCAST_KEYS.values():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rpq_fx::{name}", key), (name, key)


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Error bound of a bf16 product with fp32 accumulation: inputs rounded (2 ulp) and the result (1 ulp)."""
    return 4 * BF16_EPS * (a.abs().double() @ b.abs().double()) + 1e-6


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 40), C=st.integers(1, 4), d=st.sampled_from([1, 3, 8, 9]), N=st.integers(1, 70),
       shared=st.booleans(), path=st.sampled_from(["expand", "compressed"]), seed=st.integers(0, 2**16))
def test_linear_under_bf16_autocast_matches_the_dense_weight(backend, batch, C, d, N, shared, path, seed):
    codebooks, _, codes = make_case(C, 16, d, N, shared, torch.float32, seed)
    codebooks.requires_grad_()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, C * d, generator=gen).requires_grad_()
    bias = torch.randn(N, generator=gen).requires_grad_()
    grad = torch.randn(batch, N, generator=gen).bfloat16()
    with compute_path(path), torch.autocast("cpu", torch.bfloat16):
        out = linear(x, codebooks, codes, bias)
        dense = F.linear(x.detach(), reference_expand(codebooks.detach(), codes), bias.detach())
    assert out.dtype == dense.dtype == torch.bfloat16
    out.backward(grad)
    assert x.grad.dtype == codebooks.grad.dtype == bias.grad.dtype == torch.float32  # each in its parameter's dtype

    weight = reference_expand(codebooks.detach(), codes).double()  # the dense weight, exact
    x64, g64 = x.detach().double(), grad.double()
    expected = x64 @ weight.t() + bias.detach().double()
    assert (out.double() - expected).abs().le(_bound(x64, weight.t()) + 4 * BF16_EPS * bias.abs()).all()
    assert (x.grad.double() - g64 @ weight).abs().le(_bound(g64, weight)).all()
    dense_grad = g64.t() @ x64
    expected_cb = codebook_gradient(dense_grad, codes, codebooks.shape[0], 16)
    bound_cb = codebook_gradient(_bound(g64.t(), x64), codes, codebooks.shape[0], 16)
    assert (codebooks.grad.double() - expected_cb).abs().le(bound_cb).all()
    # the bias gradient is summed in bf16, as for F.linear under autocast: up to one rounding per term
    assert (bias.grad.double() - g64.sum(0)).abs().le(batch * BF16_EPS * g64.abs().sum(0)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_casts_to_the_autocast_dtype_as_f_linear(dtype):
    codebooks, _, codes = make_case(4, 16, 8, 50, False, torch.float32, 0)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype):
        out = linear(x, codebooks, codes)
        dense = F.linear(x, reference_expand(codebooks, codes))
        out64 = linear(x.double(), codebooks.double(), codes)  # float64 is never cast, as for F.linear
    assert out.dtype == dense.dtype == dtype
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out, dense, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out64, x.double() @ reference_expand(codebooks, codes).double().t())


def test_expand_and_embedding_keep_their_dtype_as_f_embedding():
    codebooks, _, codes = make_case(4, 16, 8, 50, False, torch.float32, 0)
    codebooks.requires_grad_()
    indices = torch.tensor([[3, 0, 49], [7, 7, 1]])
    with torch.autocast("cpu", torch.bfloat16):
        rows = embedding(indices, codebooks, codes)
        dense_rows = F.embedding(indices, reference_expand(codebooks.detach(), codes))
        weight = expand(codebooks, codes)
    assert rows.dtype == dense_rows.dtype == weight.dtype == torch.float32
    torch.testing.assert_close(rows, dense_rows, rtol=0, atol=0)
    torch.testing.assert_close(weight, reference_expand(codebooks.detach(), codes), rtol=0, atol=0)
    rows.sum().backward()
    assert codebooks.grad.dtype == torch.float32 and codebooks.grad.abs().sum() > 0


# --------------------------------------------------------------------------- AMP training of converted models

def _vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=2, mlp_ratio=4, num_classes=10)
    return model, (torch.randn(4, 3, 32, 32),), lambda out: F.cross_entropy(out, torch.arange(4))


def _convnext():
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(32, 64, 64, 128),
                              num_classes=10)
    return model, (torch.randn(4, 3, 32, 32),), lambda out: F.cross_entropy(out, torch.arange(4))


def _llama():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        vocab_size=512, max_position_embeddings=64))
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    return model, (tokens,), lambda out: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _loss_and_grads(model, inputs, loss_fn, amp: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = model(*inputs)
        loss = loss_fn(out)
    loss.backward()
    return _logits(out), loss.detach().float()


@pytest.mark.parametrize("build", [_vit, _convnext, _llama], ids=["vit", "convnext", "llama"])
def test_amp_bf16_training_of_a_converted_model(build):
    torch.manual_seed(0)
    model, inputs, loss_fn = build()
    model.train()
    converted = rpq_fx.convert(model, codebook_dim=8, num_codes=16, progress=False)
    reference = dense_reference(model, converted, leftovers=True)
    cb = [p for n, p in converted.named_parameters() if n.endswith("codebooks")]
    assert len(cb) >= 6

    out32, loss32 = _loss_and_grads(converted, inputs, loss_fn, amp=False)
    grads32 = [p.grad.clone() for p in cb]
    out16, loss16 = _loss_and_grads(converted, inputs, loss_fn, amp=True)
    assert out16.dtype == torch.bfloat16  # the last layer ran in bf16, as a dense F.linear would
    assert torch.isfinite(loss16) and abs(loss16 - loss32) <= 0.02 * abs(loss32) + 0.01, (loss16, loss32)
    for p, g32 in zip(cb, grads32):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        assert F.cosine_similarity(p.grad.flatten(), g32.flatten(), dim=0) > 0.97

    with torch.autocast("cpu", torch.bfloat16):
        dense_out = _logits(reference(*inputs))
    assert dense_out.dtype == out16.dtype
    scale = dense_out.float().abs().max()
    assert (out16.float() - dense_out.float()).abs().max() <= 0.03 * scale, "not the dense model under autocast"
    assert (out16.float() - out32).abs().max() <= 0.05 * scale

    optimizer = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        _, loss = _loss_and_grads(converted, inputs, loss_fn, amp=True)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in cb)  # AMP keeps the master codebooks in float32


def test_amp_under_compile_matches_eager():
    codebooks, _, codes = make_case(4, 16, 8, 300, False, torch.float32, 0)
    x = torch.randn(8, 32)

    def f(x, codebooks):
        with torch.autocast("cpu", torch.bfloat16):
            return linear(x, codebooks, codes)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, codebooks), f(x, codebooks))
