"""Every weight-bearing layer, called as a module and as a function, on the fx and export paths,
against the dense reference (the original layer running the decompressed weight)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import codebook_gradient
import rpq_fx

SETTINGS = dict(codebook_dim=4, num_codes=8)


class Wrap(nn.Module):
    """One layer inside a model: ``forward(*inputs)`` cannot be traced by fx, so this takes the
    in-place path, which swaps the layer for its own graph."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        return torch.tanh(self.layer(*inputs))


class Wrap1(Wrap):
    """The same, traceable by fx as a whole (the layer is a module call in the model's graph)."""

    def forward(self, a):
        return torch.tanh(self.layer(a))


class Wrap2(Wrap):
    def forward(self, a, b):
        return torch.tanh(self.layer(a, b))


class Wrap3(Wrap):
    def forward(self, a, b, c):
        return torch.tanh(self.layer(a, b, c))


def wrappers(inputs):
    return {"fx": (Wrap1, Wrap2, Wrap3)[len(inputs) - 1], "in place": Wrap}


def conv_transpose_cases():
    return [
        (nn.ConvTranspose1d(16, 8, 3, stride=2, padding=1, output_padding=1), torch.randn(2, 16, 9)),
        (nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False), torch.randn(2, 16, 5, 6)),
        (nn.ConvTranspose2d(16, 8, (3, 2), stride=(2, 1), groups=4, dilation=2), torch.randn(2, 16, 5, 5)),
        (nn.ConvTranspose3d(16, 4, 2, stride=2, groups=2), torch.randn(1, 16, 3, 3, 3)),
    ]


def embedding_bag_cases():
    tokens = torch.randint(0, 300, (10,))
    offsets = torch.tensor([0, 3, 7])
    return [
        (nn.EmbeddingBag(300, 16, mode="sum"), (tokens, offsets)),
        (nn.EmbeddingBag(300, 16, mode="mean", padding_idx=2), (tokens, offsets)),
        (nn.EmbeddingBag(300, 16, mode="max"), (torch.randint(0, 300, (3, 4)),)),
        (nn.EmbeddingBag(300, 16, mode="sum", include_last_offset=True), (tokens, torch.tensor([0, 3, 7, 10]))),
        (nn.EmbeddingBag(300, 16, mode="sum"), (tokens, offsets, torch.rand(10))),
    ]


CASES = {
    **{f"conv_transpose_{i}": case for i, case in enumerate(conv_transpose_cases())},
    **{f"embedding_bag_{i}": case for i, case in enumerate(embedding_bag_cases())},
    "bilinear": (nn.Bilinear(8, 12, 300), (torch.randn(5, 8), torch.randn(5, 12))),
    "bilinear_no_bias": (nn.Bilinear(8, 8, 300, bias=False), (torch.randn(5, 8), torch.randn(5, 8))),
    "embedding_padding_idx": (nn.Embedding(300, 16, padding_idx=0), torch.randint(0, 300, (3, 5))),
}


@pytest.mark.parametrize("path", ["fx", "in place"])
@pytest.mark.parametrize("name", CASES)
def test_layer_module_call_matches_dense_reference_and_trains(check, name, path):
    layer, inputs = CASES[name]
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    model = wrappers(inputs)[path](layer)
    converted = rpq_fx.convert(model, **SETTINGS)
    assert converted.rpq_path.replace("torch.", "").startswith(path)
    assert [layer.converted for layer in converted.rpq_layers] == [True], rpq_fx.report(converted)
    reference = check.dense_reference(model, converted)
    check.outputs_close(converted(*inputs), reference(*inputs))
    converted(*inputs).square().sum().backward()
    reference(*inputs).square().sum().backward()
    rpq_weight = converted.layer.weight
    assert rpq_weight.codebooks.grad is not None and rpq_weight.codebooks.grad.abs().sum() > 0
    # the codebook gradient is the dense weight gradient summed into each codeword
    expected = codebook_gradient(reference.layer.weight.grad, rpq_weight.codes, rpq_weight.codebooks.shape[0],
                                 rpq_weight.num_codes)
    torch.testing.assert_close(rpq_weight.codebooks.grad, expected, rtol=1e-4, atol=1e-5)


def test_embedding_padding_row_gets_no_gradient():
    model = Wrap(nn.Embedding(300, 16, padding_idx=0))
    converted = rpq_fx.convert(model, **SETTINGS)
    converted(torch.zeros(4, dtype=torch.long)).sum().backward()  # only the padding token
    assert converted.layer.weight.codebooks.grad.abs().sum() == 0


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out], applied with addmm."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.deconv = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.1)
        self.bil = nn.Parameter(torch.randn(300, 8, 8) * 0.1)
        self.table = nn.Parameter(torch.randn(300, 16))
        self.proj = Conv1D(300, 16)

    def bag(self, tokens):
        return F.embedding(tokens, self.table).mean(1)

    def forward(self, image, x, tokens):
        a = F.conv_transpose2d(image, self.deconv, stride=2).mean((2, 3))
        b = F.bilinear(x, x, self.bil)
        c = self.bag(tokens)
        return torch.cat([a, b, c, self.proj(c)], dim=1)


class FunctionalBag(Functional):
    """F.embedding_bag checks its inputs in Python, so fx cannot trace it; torch.export can."""

    def bag(self, tokens):
        return F.embedding_bag(tokens, self.table, mode="mean")


def functional_inputs():
    return torch.randn(2, 16, 4, 4), torch.randn(2, 8), torch.randint(0, 300, (2, 5))


def test_functional_calls_and_conv1d_match_dense_reference(check):
    model = Functional()
    converted = rpq_fx.convert(model, **SETTINGS)
    plans = {layer.name: layer for layer in converted.rpq_layers}
    assert all(plan.converted for plan in plans.values()), rpq_fx.report(converted)
    assert converted.rpq_path == "torch.fx"
    assert plans["proj.weight"].transposed and plans["proj.weight"].ops == ("addmm",)
    assert converted.proj.weight.shape == (300, 16), "Conv1D rows are its 300 outputs"
    check.matches_dense_reference(model, converted, *functional_inputs())


def test_export_path_reads_aten_ops_of_every_layer(check):
    model = FunctionalBag().eval()
    converted = rpq_fx.convert(model, **SETTINGS, example_inputs=functional_inputs())
    assert converted.rpq_path == "torch.export"
    ops = {layer.name: layer.ops for layer in converted.rpq_layers if layer.converted}
    assert ops == {"deconv": ("conv_transpose2d",), "bil": ("bilinear",), "table": ("embedding_bag",),
                   "proj.weight": ("addmm",)}, rpq_fx.report(converted)
    check.matches_dense_reference(model, converted, *functional_inputs())


def test_conv_transpose_with_output_size_stays_dense():
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(300, 8, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=[2, 8, 8, 8])

    converted = rpq_fx.convert(Sized(), **SETTINGS)
    (plan,) = converted.rpq_layers
    assert not plan.converted and "output_size" in plan.reason


def test_batchnorm_statistics_dropout_and_mode_switching_behave_as_the_original(check):
    model = nn.Sequential(nn.Conv2d(8, 300, 3), nn.BatchNorm2d(300), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(300 * 4 * 4, 300))
    converted = rpq_fx.convert(model, **SETTINGS)
    reference = check.dense_reference(model, converted)
    x = torch.randn(4, 8, 6, 6)
    converted.train()
    reference.train()
    torch.manual_seed(1)
    y = converted(x)
    torch.manual_seed(1)
    check.outputs_close(y, reference(x))  # same dropout mask, batch statistics
    torch.testing.assert_close(converted.get_submodule("1").running_mean, reference[1].running_mean)
    assert converted.get_submodule("1").num_batches_tracked == 1
    converted.eval()
    reference.eval()
    with torch.no_grad():
        check.outputs_close(converted(x), reference(x))  # running statistics, no dropout
        torch.testing.assert_close(converted(x), converted(x))


class Leaves(nn.Module):
    """torch.nn leaves fx does not trace into: called through functional_call with expanded weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.rnn = nn.LSTM(64, 96, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(96, 4, dim_feedforward=384, batch_first=True, dropout=0.0)
        self.norm = nn.BatchNorm1d(96)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        h, _ = self.rnn(h)
        return self.norm(self.encoder(h).transpose(1, 2))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_torch_leaf_modules_convert_through_functional_call(check, checkpoint):
    model = Leaves()
    converted = rpq_fx.convert(model, codebook_dim=16, num_codes=16, checkpoint=checkpoint)
    plans = {layer.name: layer for layer in converted.rpq_layers}
    for name in ("attn.in_proj_weight", "attn.out_proj.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0",
                 "encoder.self_attn.in_proj_weight", "encoder.linear1.weight", "encoder.linear2.weight"):
        assert plans[name].converted, (name, plans[name].reason)
    assert plans["attn.in_proj_weight"].ops == ("MultiheadAttention",)
    assert "functional_call" in converted.print_readable(print_output=False)
    print(converted)  # the emptied leaves still print
    assert not [t for t in converted.state_dict().values() if t.is_meta], "no placeholder in the state"
    x = torch.randn(3, 7, 64)
    converted.train()
    reference = check.dense_reference(model, converted).train()
    check.outputs_close(converted(x), reference(x))  # BatchNorm batch statistics, updated in the container
    torch.testing.assert_close(converted.norm.running_mean, reference.norm.running_mean)
    converted(x).square().mean().backward()
    reference(x)  # the same number of BatchNorm updates
    assert converted.rnn.weight_ih_l0.codebooks.grad.abs().sum() > 0
    assert converted.attn.in_proj_weight.codebooks.grad.abs().sum() > 0
    converted.eval()
    reference.eval()
    with torch.no_grad():
        check.outputs_close(converted(x), reference(x))


@pytest.mark.parametrize("spelling", ["module", "functional", "export"])
def test_embedding_padding_row_starts_at_zero_and_stays_there_through_training(spelling):
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(300, 16, padding_idx=3)
            self.head = nn.Linear(16, 8)

        def forward(self, tokens):
            table = self.emb(tokens) if spelling != "functional" else F.embedding(tokens, self.emb.weight, 3)
            return self.head(table)

    tokens = torch.randint(0, 300, (4, 6))
    tokens[:, 0] = 3
    kwargs = {"example_inputs": tokens} if spelling == "export" else {}
    converted = rpq_fx.convert(Lookup(), **SETTINGS, **kwargs)
    (plan,) = [layer for layer in converted.rpq_layers if layer.name == "emb.weight"]
    assert plan.converted and plan.padding_rows == (3,)
    optimizer = torch.optim.AdamW(converted.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        converted(tokens).square().mean().backward()
        optimizer.step()
    dense = rpq_fx.decompress(converted)["emb.weight"]
    assert torch.equal(dense[3], torch.zeros(16)) and dense[4].abs().sum() > 0
    assert (dense[torch.arange(300) != 3] != 0).any(dim=1).all(), "no other row reads the zero codeword"
