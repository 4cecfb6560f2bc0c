"""The in-place add pass: ``a + b`` becomes ``add_into(a, b)`` exactly where ``a`` is a fresh tensor only that add
reads, and ``add_into`` writes into ``a`` only where that gives ``a + b`` with no autograd recording through it."""

import copy
import io

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import codebook_gradient
import rpq_fx
from rpq_fx.graph_module import graphs_of
from rpq_fx.passes import inplace_adds
from rpq_fx.passes.inplace import add_into

timm_resnet = pytest.importorskip("timm.models.resnet")
aten = torch.ops.aten


def adds_into(gm: fx.GraphModule) -> list[str]:
    return [n.name for graph in graphs_of(gm) for n in graph.nodes if n.op == "call_function" and n.target is add_into]


class AtenAdds(TorchDispatchMode):
    """Counts the out-of-place and in-place tensor adds that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.calls = {"add": 0, "add_": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.add.Tensor:
            self.calls["add"] += 1
        elif func is aten.add_.Tensor:
            self.calls["add_"] += 1
        return func(*args, **(kwargs or {}))


def convert(model: nn.Module) -> fx.GraphModule:
    """Small codebooks (16 shared codewords of 4 values), so that the test models' small layers shrink and convert."""
    return rpq_fx.convert(model, codebook_dim=4, num_codes=16, shared_codebooks=True)


def tiny_resnet() -> nn.Module:
    """timm's ResNet with Bottleneck blocks (``x += shortcut``), one block per stage, narrow channels."""
    model = timm_resnet.ResNet(timm_resnet.Bottleneck, (1, 1, 1, 1), num_classes=10, channels=(8, 16, 32, 64),
                               stem_width=8, zero_init_last=False)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial eval statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


class PlusEquals(nn.Module):
    """``y += x`` on a converted linear layer's output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        y = self.fc(x)
        y += x
        return torch.relu(y)


def test_timm_bottleneck_residual_adds_are_rewritten_and_match_the_dense_reference(check):
    model = tiny_resnet()
    gm = convert(model)
    assert adds_into(gm) == ["add", "add_1", "add_2", "add_3"], "one residual add per block"
    x = torch.randn(2, 3, 32, 32)
    check.matches_dense_reference(model, gm, x)
    reference = check.dense_reference(model, gm)
    expected = reference(x)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), AtenAdds() as adds:
            out = gm(x)
        assert adds.calls == {"add": 0, "add_": 4}, mode
        check.outputs_close(out, expected)


def test_plus_equals_on_a_fused_linear_is_rewritten(check):
    model = PlusEquals()
    gm = convert(model)
    assert adds_into(gm) == ["add"]
    check.matches_dense_reference(model, gm, torch.randn(5, 64))


def test_a_chain_of_adds_is_rewritten_once(check):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(x) + x + 1.5  # the second add's left operand is the first add

    model = Chain()
    gm = convert(model)
    assert adds_into(gm) == ["add", "add_1"]
    assert inplace_adds(gm) == 0, "a second run finds nothing left"
    x = torch.randn(5, 64)
    with torch.no_grad(), AtenAdds() as adds:
        gm(x)
    assert adds.calls == {"add": 0, "add_": 2}
    check.matches_dense_reference(model, gm, x)


def test_backward_through_a_converted_resnet_matches_the_dense_model(check):
    model = tiny_resnet()
    gm = convert(model)
    reference = check.dense_reference(model, gm)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight = torch.linspace(-1, 1, 10)
    with AtenAdds() as adds:
        out = gm(x)
    assert adds.calls["add_"] == 0, "autograd records through the adds: they stay out of place"
    (out * weight).sum().backward()
    (reference(x_ref) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6 * x_ref.grad.abs().max().item())
    names = check.converted_names(gm)
    assert len(names) > 10
    for name in names:
        rpq = gm.get_submodule(name)
        dense = reference.get_parameter(name).grad
        expected = codebook_gradient(dense.reshape(dense.shape[0], -1), rpq.codes, rpq.codebooks.shape[0],
                                     rpq.num_codes)
        torch.testing.assert_close(rpq.codebooks.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_train_mode_steps_like_the_dense_model(check):
    """Batch norm in training mode (batch statistics, running stats updated): same loss and input gradient."""
    model = tiny_resnet()
    gm = convert(model)
    reference = check.dense_reference(model, gm).train()
    gm.train()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    gm(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    # reason: batch statistics amplify float32 rounding (the 1x1 convs sum in another order than F.conv2d)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-5 * x_ref.grad.abs().max().item())


def test_a_pickled_or_copied_model_keeps_its_in_place_adds(check):
    model = PlusEquals()
    gm = convert(model)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), copy.deepcopy(gm)):
        assert len(adds_into(loaded)) == 1
        x = torch.randn(5, 64)
        with torch.no_grad(), AtenAdds() as adds:
            loaded(x)
        assert adds.calls["add_"] == 1 and adds.calls["add"] == 0
        check.matches_dense_reference(model, loaded, x)


# --------------------------------------------------------------------------- adds the pass leaves alone

class OtherUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        a = self.fc(x)
        return (a + x) * a  # a is read after the add


class InputOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return x + self.fc(x)  # the left operand is the graph's input


class ParameterOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.offset = nn.Parameter(torch.randn(64))

    def forward(self, x):
        return self.offset + self.fc(x)  # the left operand is a parameter


class ViewOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x).view(-1, 8, 8) + x.view(-1, 8, 8)  # a view: not known to be fresh


class IdentityOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.id = nn.Identity()

    def forward(self, x):
        return self.id(x) + self.fc(x)  # Identity returns its input


class Alpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return torch.add(self.fc(x), x, alpha=2)


class Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.bn = nn.BatchNorm1d(64)
        self.bn.register_forward_hook(lambda module, args, out: None)  # a hook could keep bn's output

    def forward(self, x):
        return self.bn(self.fc(x)) + x


@pytest.mark.parametrize("model", [OtherUser, InputOperand, ParameterOperand, ViewOperand, IdentityOperand, Alpha,
                                   Hooked], ids=lambda m: m.__name__)
def test_unsafe_adds_are_left_out_of_place(check, model):
    model = model().eval()
    gm = convert(model)
    assert adds_into(gm) == []
    assert inplace_adds(gm) == 0
    check.matches_dense_reference(model, gm, torch.randn(5, 64))


# --------------------------------------------------------------------------- add_into at run time

def test_add_into_writes_into_a_when_nothing_records():
    a, b = torch.randn(4, 5), torch.randn(5)
    expected = a + b
    with torch.no_grad():
        out = add_into(a, b)
    assert out is a and torch.equal(out, expected)
    c = torch.randn(3)
    assert add_into(c, 2) is c  # a number: no autograd, same dtype


@pytest.mark.parametrize("case", ["broadcast grows a", "dtype promotes", "a records grad", "b records grad",
                                  "int a, float number"])
def test_add_into_stays_out_of_place_where_in_place_would_differ(case):
    a, b = torch.randn(4, 1), torch.randn(4, 5)
    if case == "dtype promotes":
        a, b = torch.randn(4, 5, dtype=torch.float16), torch.randn(4, 5)
    elif case == "a records grad":
        a, b = torch.randn(4, 5).requires_grad_() * 1, torch.randn(4, 5)  # a non-leaf whose producer saved nothing
    elif case == "b records grad":
        a, b = torch.randn(4, 5), torch.randn(5, requires_grad=True)
    elif case == "int a, float number":
        a, b = torch.arange(6), 0.5
    before = a.detach().clone()
    expected = a + b
    out = add_into(a, b)
    assert out is not a and torch.equal(a, before), "a was written"
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if case.endswith("records grad"):
        assert out.grad_fn is not None and out.requires_grad


def test_broadcast_that_would_grow_the_left_operand_runs_out_of_place_in_a_model(check):
    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.head = nn.Linear(64, 1)

        def forward(self, x):
            return self.head(x) + self.fc(x)  # [B, 1] + [B, 64]

    model = Narrow().eval()
    gm = convert(model)
    assert adds_into(gm) == ["add"], "the left operand is fresh: only the run time knows the shapes"
    x = torch.randn(5, 64)
    with torch.no_grad(), AtenAdds() as adds:
        gm(x)
    assert adds.calls == {"add": 1, "add_": 0}
    check.matches_dense_reference(model, gm, x)


# --------------------------------------------------------------------------- deployment exports

def test_torch_export_and_onnx_of_a_model_with_in_place_adds(check, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_resnet()
    gm = convert(model).eval()
    assert len(adds_into(gm)) == 4
    x = torch.randn(2, 3, 32, 32)
    reference = check.dense_reference(model, gm)
    with torch.no_grad():
        expected = reference(x)
    exported = torch.export.export(gm, (x,))
    check.outputs_close(exported.module()(x), expected)
    path = rpq_fx.export_onnx(gm, (x,), tmp_path / "resnet.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    check.outputs_close(torch.from_numpy(actual), expected)
