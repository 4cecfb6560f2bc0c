"""The fuse pass: ``expand → linear`` becomes ``rpq_fx::linear``, ``expand → embedding`` becomes
``rpq_fx::embedding``; the fused graph computes what the decompressed dense reference computes."""

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from conftest import codebook_gradient
import rpq_fx
from rpq_fx.graph_module import graphs_of
from rpq_fx.nn import RPQWeight
from rpq_fx.passes import fuse

EXPAND = torch.ops.rpq_fx.expand.default
LINEAR = torch.ops.rpq_fx.linear.default
EMBEDDING = torch.ops.rpq_fx.embedding.default


def nodes(model: nn.Module, target) -> list[fx.Node]:
    """Call nodes of ``target`` in every graph of every GraphModule in ``model`` (converted in place or whole)."""
    graphs = [g for m in model.modules() if isinstance(m, fx.GraphModule) for g in graphs_of(m)]
    return [n for graph in graphs for n in graph.nodes if n.op == "call_function" and n.target is target]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 512, 3, padding=1)
        self.fc = nn.Linear(512, 512)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 512)
        self.fc2 = nn.Linear(512, 512, bias=False)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out] and read by addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx**-0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):  # as transformers' pytorch_utils.Conv1D
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(1000, 64)
        self.c_fc = Conv1D(64, 512)
        self.c_proj = Conv1D(512, 512)

    def forward(self, tokens):
        return self.c_proj(F.gelu(self.c_fc(self.wte(tokens))))


@pytest.fixture(params=["auto", "compressed", "expand"])
def path(request, monkeypatch):
    """Every test runs with the per-call choice left to the op and with each path forced."""
    monkeypatch.setenv("RPQ_FX_PATH", request.param)
    return request.param


def test_linear_layers_become_one_fused_node_each(check, path):
    model = MLP()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert not nodes(gm, EXPAND), "every linear expansion is fused"
    fused = nodes(gm, LINEAR)
    assert sorted(n.name for n in fused) == ["fc1", "fc2"]  # the head (10 rows) stays dense
    fc1 = next(n for n in fused if n.name == "fc1")
    assert [a.target if isinstance(a, fx.Node) else a for a in fc1.args[1:]] == [
        "fc1.weight.codebooks", "fc1.weight.codes", "fc1.bias"]
    assert next(n for n in fused if n.name == "fc2").args[3] is None
    assert "torch.ops.rpq_fx.linear.default(relu, fc2_weight_codebooks, fc2_weight_codes, None)" in gm.code
    check.matches_dense_reference(model, gm, torch.randn(5, 128))
    check.matches_dense_reference(model, gm, torch.randn(2, 3, 128))


def test_fused_gradients_equal_the_dense_reference(check, path):
    model = MLP()
    gm = rpq_fx.convert(model, codebook_dim=32)
    reference = check.dense_reference(model, gm)
    x, x_ref = torch.randn(6, 128, requires_grad=True), torch.randn(6, 128)
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.linspace(-1, 1, 10)
    (gm(x) * weight).sum().backward()
    (reference(x_ref) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    for name in check.converted_names(gm):
        rpq = gm.get_submodule(name)
        expected = codebook_gradient(reference.get_parameter(name).grad, rpq.codes, rpq.codebooks.shape[0],
                                     rpq.num_codes)
        torch.testing.assert_close(rpq.codebooks.grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    torch.testing.assert_close(gm.fc1.bias.grad, reference.fc1.bias.grad)


def test_functional_calls_fuse_and_convolutions_keep_their_expansion(check, zoo, path):
    model = zoo.Functional()
    gm = rpq_fx.convert(model, codebook_dim=4)
    assert len(nodes(gm, LINEAR)) == 1 and len(nodes(gm, EMBEDDING)) == 1
    (conv_expansion,) = nodes(gm, EXPAND)
    assert next(iter(conv_expansion.users)).target == "view"
    check.matches_dense_reference(model, gm, *zoo.functional_inputs())


def test_tied_embedding_and_head_read_one_weight(check, zoo, path):
    model = zoo.TiedLM()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert not nodes(gm, EXPAND)
    (emb,), (head,) = nodes(gm, EMBEDDING), nodes(gm, LINEAR)
    assert emb.args[1].target == head.args[1].target or (
        gm.get_submodule(emb.args[1].target.rpartition(".")[0]) is gm.get_submodule(head.args[1].target.rpartition(".")[0]))
    tokens = torch.randint(0, 1000, (2, 9))
    check.matches_dense_reference(model, gm, tokens)
    gm(tokens).square().mean().backward()
    (weight,) = {id(m): m for m in gm.modules() if isinstance(m, RPQWeight)}.values()
    assert weight.codebooks.grad.abs().sum() > 0


def test_embedding_padding_idx_and_scale_grad_by_freq_are_kept(check, path):
    model = nn.Sequential(nn.Embedding(600, 32, padding_idx=3, scale_grad_by_freq=True))
    gm = rpq_fx.convert(model, codebook_dim=8)
    (emb,) = nodes(gm, EMBEDDING)
    assert emb.args[3:] == (3, True)
    tokens = torch.tensor([[3, 5, 5, 3, 7]])
    reference = check.matches_dense_reference(model, gm, tokens)
    gm(tokens).square().sum().backward()
    reference(tokens).square().sum().backward()
    rpq = gm.get_submodule("0.weight")
    dense_grad = reference[0].weight.grad.reshape(600, rpq.num_codebooks, -1)
    assert dense_grad[3].abs().sum() == 0
    expected = codebook_gradient(dense_grad, rpq.codes, rpq.codebooks.shape[0], rpq.num_codes)
    torch.testing.assert_close(rpq.codebooks.grad, expected)


def test_embedding_lookup_expands_only_its_rows():
    model = nn.Sequential(nn.Embedding(50000, 64))
    gm = rpq_fx.convert(model, codebook_dim=16)
    weight = gm.get_submodule("0.weight")
    tokens = torch.randint(0, 50000, (2, 4))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        gm(tokens).sum().backward()
    read = [torch.Size(s).numel() for e in prof.events() for s in (e.input_shapes or [])
            if isinstance(s, list) and all(isinstance(v, int) for v in s)]
    assert max(read) <= max(weight.codes.numel(), weight.codebooks.numel()) < 50000 * 64


def test_gpt2_conv1d_addmm_is_fused(check, path):
    model = GPT2Block()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert len(nodes(gm, LINEAR)) == 2 and len(nodes(gm, EMBEDDING)) == 1
    assert not nodes(gm, EXPAND) and not nodes(gm, torch.addmm)
    check.matches_dense_reference(model, gm, torch.randint(0, 1000, (2, 7)))


def test_checkpoint_leaves_fused_nodes_alone(check, path):
    model = ConvNet()
    plain = rpq_fx.convert(model, codebook_dim=16)
    ckpt = rpq_fx.convert(model, codebook_dim=16, checkpoint=True)
    assert [n.name for n in nodes(ckpt, LINEAR)] == [n.name for n in nodes(plain, LINEAR)] == ["fc"]
    wrapped = [n for n in ckpt.graph.nodes if n.target is torch.utils.checkpoint.checkpoint]
    assert [n.name for n in wrapped] == ["conv"], "only the convolution's expansion is checkpointed"
    assert len(nodes(plain, EXPAND)) == 1
    x = torch.randn(3, 16, 6, 6)
    check.matches_dense_reference(model, ckpt, x)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_model_keeps_no_dense_weight_for_backward(path):
    model = MLP()
    gm = rpq_fx.convert(model, codebook_dim=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = gm(torch.randn(4, 128, requires_grad=True))
    out.sum().backward()
    assert not {(512, 128), (512, 512)} & set(saved), "no dense weight is kept, without checkpoint=True"


def test_both_mode_graphs_are_fused(check):
    class ModeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 512), nn.Linear(512, 512)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            if self.training:
                h = h * 3 - 1
            return self.fc2(h)

    model = ModeBranch().train()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert len(graphs_of(gm)) == 2
    for graph in graphs_of(gm):
        assert sum(n.target is LINEAR for n in graph.nodes) == 2
        assert not any(n.target is EXPAND for n in graph.nodes)
    reference = check.dense_reference(model, gm)
    x = torch.randn(3, 64)
    for training in (True, False):
        gm.train(training)
        reference.train(training)
        with torch.no_grad():
            check.outputs_close(gm(x), reference(x))


def test_torch_export_graphs_are_fused(check, zoo):
    model = zoo.TiedLM()
    tokens = torch.randint(0, 1000, (2, 9))
    gm = rpq_fx.convert(model, codebook_dim=16, example_inputs=(tokens,))
    assert nodes(gm, LINEAR) and nodes(gm, EMBEDDING) and not nodes(gm, EXPAND)
    check.matches_dense_reference(model, gm, tokens)


# --------------------------------------------------------------------------- hand-built graphs: what is not fused

def _graph_module(build) -> fx.GraphModule:
    """A GraphModule over one RPQ weight ``w`` (512 x 64), its graph written by ``build(graph, x, expansion)``."""
    root = nn.Module()
    root.w = RPQWeight(4, 16, 512)
    graph = fx.Graph()
    x = graph.placeholder("x")
    expansion = graph.call_function(EXPAND, (graph.get_attr("w.codebooks"), graph.get_attr("w.codes")))
    graph.output(build(graph, x, expansion))
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("case", ["two users", "not the weight", "max_norm", "sparse", "addmm beta", "conv"])
def test_uses_that_are_not_fused(case):
    def build(graph, x, w):
        if case == "two users":
            return graph.call_function(operator_add, (graph.call_function(F.linear, (x, w)), graph.call_method("sum", (w,))))
        if case == "not the weight":
            return graph.call_function(F.linear, (w, graph.call_method("t", (w,))))
        if case == "max_norm":
            return graph.call_function(F.embedding, (x, w), {"max_norm": 1.0})
        if case == "sparse":
            return graph.call_function(F.embedding, (x, w, None, None, 2.0, False, True))
        if case == "addmm beta":
            return graph.call_function(torch.addmm, (graph.call_function(torch.zeros, (512,)), x,
                                                     graph.call_method("t", (w,))), {"beta": 0.5})
        return graph.call_function(F.conv1d, (x, graph.call_method("view", (w, (512, 16, 4)))))

    gm = _graph_module(build)
    before = gm.code
    assert fuse(gm) == 0
    assert gm.code == before and nodes(gm, EXPAND)


def test_hand_built_graph_with_keywords_is_fused():
    gm = _graph_module(lambda graph, x, w: graph.call_function(F.linear, (), {"input": x, "weight": w}))
    x = torch.randn(3, 64)
    expected = gm(x)
    assert fuse(gm) == 1
    assert not nodes(gm, EXPAND) and len(nodes(gm, LINEAR)) == 1
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)


def operator_add(a, b):
    return a + b


# --------------------------------------------------------------------------- convolutions: rpq_fx::conv

CONV = torch.ops.rpq_fx.conv.default


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 KiB of weight whatever the input's size, so that the test models' convolutions are fused and
    run in several blocks."""
    import rpq_fx.ops.conv

    monkeypatch.setattr(rpq_fx.ops.conv, "BLOCK_BYTES", 16 * 2**10)
    monkeypatch.setattr(rpq_fx.ops.conv, "INPUT_RATIO", 0)


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_big_convolutions_become_one_blocked_conv_node(check, zoo, small_blocks, mode):
    model = zoo.ConvVariants().eval()
    inputs = zoo.conv_inputs()
    gm = rpq_fx.convert(model, codebook_dim=4, **({"example_inputs": inputs} if mode == "export" else {}))
    fused = nodes(gm, CONV)
    # padding="same" keeps its expansion (a string padding; export's aten.conv2d.padding is not converted at all);
    # the reflect / circular ones are padded before the conv
    assert len(fused) == 4 and len(nodes(gm, EXPAND)) == (1 if mode == "fx" else 0)
    grouped = next(n for n in fused if n.args[8] == 4)
    assert grouped.args[4:] == ([512, 128, 3, 3], [2, 2], [2, 2], [2, 2], 4)
    check.matches_dense_reference(model, gm, *inputs)


def test_only_convolutions_above_one_block_are_fused(zoo):
    gm = rpq_fx.convert(zoo.ConvVariants(), codebook_dim=4)  # 2 MiB blocks: only the grouped 2.4 MB weight
    assert [n.name for n in nodes(gm, CONV)] == ["grouped"] and len(nodes(gm, EXPAND)) == 4


def test_fused_conv_gradients_equal_the_dense_reference(check, small_blocks):
    model = ConvNet()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert [n.name for n in nodes(gm, CONV)] == ["conv"]
    reference = check.dense_reference(model, gm)
    x = torch.randn(2, 16, 7, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    gm(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)
    rpq = gm.get_submodule("conv.weight")
    expected = codebook_gradient(reference.conv.weight.grad.reshape(512, -1), rpq.codes, rpq.codebooks.shape[0],
                                 rpq.num_codes)
    torch.testing.assert_close(rpq.codebooks.grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    torch.testing.assert_close(gm.conv.bias.grad, reference.conv.bias.grad, rtol=1e-4, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gm(x)
    assert (512, 16, 3, 3) not in saved and (512, 144) not in saved, "no dense conv weight is kept for backward"
