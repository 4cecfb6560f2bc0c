"""Each graph pass on its own: capture → plan → rewrite → checkpoint → cleanup."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import rpq_fx
from rpq_fx import RPQConfig, RPQConversionError
from rpq_fx.nn import RPQWeight
from rpq_fx.passes import capture, cleanup, insert_checkpoints, new_weights, plan_conversion, rewrite

EXPAND = torch.ops.rpq_fx.expand.default


def expansions(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is EXPAND]


def plans_by_name(plans):
    return {p.name: p for p in plans}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(128, 512)
        self.fc2 = nn.Linear(512, 512)
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DataDependent(nn.Module):
    """Control flow on input values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(64, 512)

    def forward(self, x):
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


class UsesDataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DataDependent()
        self.fc = nn.Linear(512, 512)

    def forward(self, x):
        return self.fc(self.block(x))


# ---------------------------------------------------------------------------------------------------
# capture


def test_capture_shares_the_models_parameters():
    model = MLP()
    gm = capture(model)
    assert isinstance(gm, fx.GraphModule)
    for name, param in model.named_parameters():
        captured = gm.get_parameter(name)
        assert captured is param, f"{name} was copied, not shared"
    assert gm.fc1 is model.fc1
    x = torch.randn(3, 128)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    # leaf policy: torch.nn layers stay whole call_module nodes
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc1", "fc2", "head"]


def test_capture_untraceable_model_says_what_to_do():
    model = UsesDataDependent()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RPQConversionError) as info:
        capture(model)
    message = str(info.value)
    assert "UsesDataDependent" in message
    assert "control flow" in message.lower()
    assert "convert" in message and "traceable part" in message  # says what to do instead
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture
def notrace_registered():
    """Register ``DataDependent`` in timm's no-trace registry for one test, then take it out again."""
    timm_fx = pytest.importorskip("timm.layers._fx")
    from timm.layers import get_notrace_modules, register_notrace_module

    assert DataDependent not in get_notrace_modules()
    register_notrace_module(DataDependent)
    try:
        yield
    finally:
        timm_fx._leaf_modules.discard(DataDependent)


def test_capture_respects_timm_notrace_registry(notrace_registered, check):
    model = UsesDataDependent()
    gm = capture(model)
    leaves = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert "block" in leaves, "a timm no-trace module must be one leaf call"
    assert "block.inner" not in leaves
    x = torch.randn(2, 64)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(gm(-x.abs()), model(-x.abs()), rtol=0, atol=0)

    # the weight inside the leaf is converted too: the leaf is called with it through functional_call
    plans = plans_by_name(plan_conversion(gm, model, RPQConfig(codebook_dim=16)))
    assert plans["block.inner.weight"].converted and plans["block.inner.weight"].ops == ("DataDependent",)
    assert plans["fc.weight"].converted
    converted = rpq_fx.convert(model, codebook_dim=16)
    assert "functional_call" in converted.code
    check.matches_dense_reference(model, converted, x)
    check.matches_dense_reference(model, converted, -x.abs())


# ---------------------------------------------------------------------------------------------------
# plan


class PlanZoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(64, 1024)  # converts
        self.odd = nn.Linear(60, 1024)  # 60 % 16 != 0 (codebook_dim=16)
        self.small = nn.Linear(1024, 64)  # 64 rows: would grow
        self.skipme = nn.Linear(64, 1024)  # config override skip
        self.filtered = nn.Linear(64, 1024)  # filter_fn excludes
        self.renorm = nn.Embedding(2048, 64, max_norm=1.0)  # refused
        self.mha = nn.MultiheadAttention(64, 4)  # a leaf called through functional_call; too small here
        self.up = nn.ConvTranspose2d(512, 16, 3)  # supported leaf: rows are its 512 input channels
        self.norm = nn.LayerNorm(64)  # 1-D: not listed

    def forward(self, x, x60, tokens, img):
        q = self.norm(self.renorm(tokens))
        a = self.mha(q, q, q)[0]
        return (self.big(x), self.odd(x60), self.small(self.big(x)), self.skipme(x), self.filtered(x), a,
                self.up(img))


def _plan_zoo(**kwargs):
    model = PlanZoo()
    gm = capture(model)
    config = RPQConfig(codebook_dim=16, overrides={"skip*": {"skip": True}})
    return model, gm, plan_conversion(gm, model, config, filter_fn=lambda layer, name: name != "filtered", **kwargs)


def test_plan_decides_every_weight_with_a_reason():
    model, gm, plans = _plan_zoo()
    by_name = plans_by_name(plans)
    assert set(by_name) == {"big.weight", "odd.weight", "small.weight", "skipme.weight", "filtered.weight",
                            "renorm.weight", "mha.in_proj_weight", "mha.out_proj.weight", "up.weight"}
    assert "norm.weight" not in by_name and "big.bias" not in by_name  # 1-D params are not weights

    big = by_name["big.weight"]
    assert big.converted and big.reason is None
    assert (big.num_codebooks, big.codebook_dim, big.settings.num_codes) == (4, 16, 256)
    assert big.ops == ("linear",) and big.shape == (1024, 64) and big.param is model.big.weight

    def reason(name):
        plan = by_name[name]
        assert not plan.converted
        assert plan.num_codebooks is None
        return plan.reason

    assert "60" in reason("odd.weight") and "divisible" in reason("odd.weight")
    assert "would grow" in reason("small.weight")
    assert "filter_fn" in reason("filtered.weight") and by_name["filtered.weight"].excluded
    assert "override" in reason("skipme.weight") and by_name["skipme.weight"].excluded
    assert "max_norm" in reason("renorm.weight")
    assert "would grow" in reason("mha.in_proj_weight") and by_name["mha.in_proj_weight"].ops == ("MultiheadAttention",)
    assert "would grow" in reason("mha.out_proj.weight")
    assert by_name["up.weight"].converted and by_name["up.weight"].ops == ("conv_transpose2d",)
    assert not any(by_name[n].excluded for n in ("odd.weight", "small.weight", "renorm.weight"))


@pytest.mark.parametrize("call, refused", [
    (lambda t, w: F.embedding(t, w, max_norm=1.0), "max_norm=1.0"),
    (lambda t, w: F.embedding(t, w, None, 2.0), "max_norm=2.0"),
    (lambda t, w: F.embedding(t, w, sparse=True), "sparse"),
    (lambda t, w: F.embedding(t, w, 0, None, 2.0, False, True), "sparse"),
    (lambda t, w: F.embedding(t, w, padding_idx=0), None),  # fine: converts
])
def test_plan_functional_embedding_that_renormalises_or_is_sparse_stays_dense(call, refused):
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(1000, 64))

        def forward(self, tokens):
            return F.linear(call(tokens, self.table), self.table)  # tied: a renorm must show in the logits too

    model = Table()
    plans = plan_conversion(capture(model), model, RPQConfig(codebook_dim=16))
    assert len(plans) == 1
    if refused is None:
        assert plans[0].converted
    else:
        assert not plans[0].converted and refused in plans[0].reason


def test_plan_changes_nothing():
    model = PlanZoo()
    before = {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    gm = capture(model)
    code = gm.code
    plan_conversion(gm, model, RPQConfig(codebook_dim=16))
    assert gm.code == code
    after = model.state_dict(keep_vars=True)
    assert all(id(after[k]) == i and torch.equal(after[k], v) for k, (i, v) in before.items())


def test_plan_strict_names_every_failing_layer_but_not_exclusions():
    with pytest.raises(RPQConversionError) as info:
        _plan_zoo(strict=True)
    message = str(info.value)
    for name in ("odd.weight", "small.weight", "renorm.weight", "mha.in_proj_weight"):
        assert name in message
    for name in ("big.weight", "filtered.weight", "skipme.weight"):
        assert name not in message


def test_plan_strict_passes_when_everything_converts():
    model = MLP()
    gm = capture(model)
    plans = plan_conversion(gm, model, RPQConfig(codebook_dim=16), filter_fn=lambda m, n: n != "head", strict=True)
    assert [p.name for p in plans if p.converted] == ["fc1.weight", "fc2.weight"]


def test_plan_filter_fn_sees_the_layer_and_its_name():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 512)
            self.w = nn.Parameter(torch.randn(512, 64))

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.w)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    model = Outer()
    seen = []

    def keep(layer, name):
        seen.append((layer, name))
        return name != "inner.w"

    plans = plans_by_name(plan_conversion(capture(model), model, RPQConfig(codebook_dim=16), filter_fn=keep))
    assert len(seen) == 2
    assert any(layer is model.inner.fc and name == "inner.fc" for layer, name in seen)  # module call: the layer
    assert any(layer is model.inner.w and name == "inner.w" for layer, name in seen)  # functional: the Parameter
    assert plans["inner.fc.weight"].converted
    assert not plans["inner.w"].converted and plans["inner.w"].excluded


def test_plan_shared_and_tied_weights_planned_once(zoo):
    tied = zoo.TiedLM()
    plans = plan_conversion(capture(tied), tied, RPQConfig(codebook_dim=16))
    assert len(plans) == 1
    assert set(plans[0].aliases) == {"emb.weight", "lm_head.weight"}
    assert set(plans[0].ops) == {"embedding", "linear"} and plans[0].converted

    shared = zoo.SharedModule()
    plans = plans_by_name(plan_conversion(capture(shared), shared, RPQConfig(codebook_dim=16)))
    assert plans["fc.weight"].aliases == ("fc.weight",) and plans["fc.weight"].converted


# ---------------------------------------------------------------------------------------------------
# rewrite


def _rewritten(model, **config):
    gm = capture(model)
    plans = plan_conversion(gm, model, RPQConfig(**config))
    rewrite(gm, plans, new_weights(plans, seed=0))
    gm.recompile()
    return gm, plans


def test_rewrite_replaces_layer_weights_with_expansions():
    model = MLP()
    gm, plans = _rewritten(model, codebook_dim=16)
    assert [p.name for p in plans if p.converted] == ["fc1.weight", "fc2.weight"]  # head: 10 rows would grow
    gm.graph.lint()
    code = gm.code
    assert code.count("torch.ops.rpq_fx.expand") == 2
    state = gm.state_dict()
    for name in ("fc1", "fc2"):
        assert f"{name}.weight" not in state
        assert f"{name}.weight.codebooks" in state and f"{name}.weight.codes" in state
        assert f"self.{name}.weight.codebooks" in code
        container = gm.get_submodule(name)
        assert type(container) is nn.Module, "a converted layer is a plain container"
        assert set(container._modules) == {"weight"} and set(container._parameters) == {"bias"}
        assert isinstance(container.weight, RPQWeight) and container.bias is getattr(model, name).bias
        assert not [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    assert "head.weight" in state
    # the computation is the dense one with the expanded weights
    x = torch.randn(4, 128)
    w1, w2 = (gm.get_submodule(f"{n}.weight")() for n in ("fc1", "fc2"))
    expected = model.head(torch.relu(F.linear(torch.relu(F.linear(x, w1, model.fc1.bias)), w2, model.fc2.bias)))
    torch.testing.assert_close(gm(x), expected)


def test_rewrite_leaves_unconverted_layers_as_module_calls():
    model = MLP()
    gm, plans = _rewritten(model, num_codebooks=8)  # head: 10 rows x 512 would grow
    assert not plans_by_name(plans)["head.weight"].converted
    assert gm.head is model.head and isinstance(gm.head, nn.Linear)
    assert "head.weight" in gm.state_dict()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["head"]
    assert len(expansions(gm)) == 2


def test_rewrite_functional_parameters(zoo):
    model = zoo.Functional()
    gm, plans = _rewritten(model, codebook_dim=16)
    assert isinstance(gm.w, RPQWeight) and isinstance(gm.table, RPQWeight)
    assert "w" not in gm._parameters and "table" not in gm._parameters
    assert not plans_by_name(plans)["k"].converted  # 36 values per row, 36 % 16 != 0
    assert "b" in gm._parameters  # bias stays dense
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"w.codebooks", "w.codes", "table.codebooks", "table.codes", "b", "k"} <= targets
    assert "w" not in targets and "table" not in targets


def test_rewrite_conv_views_rows_as_the_kernel(zoo):
    model = zoo.ConvVariants()
    gm, plans = _rewritten(model, codebook_dim=4)
    for name in ("reflect", "grouped", "same", "circular1d", "conv3d"):
        weight = gm.get_submodule(f"{name}.weight")
        assert isinstance(weight, RPQWeight)
        assert weight().shape == getattr(model, name).weight.shape
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert {v.args[0].target for v in views} == {EXPAND} and len(views) == 5


def test_rewrite_one_rpq_weight_per_parameter(zoo):
    tied = zoo.TiedLM()
    gm, _ = _rewritten(tied, codebook_dim=16)
    assert gm.emb.weight is gm.lm_head.weight
    assert len(expansions(gm)) == 2  # one expansion per use, one weight
    assert len([p for p in gm.parameters() if p.dim() == 3]) == 1

    shared = zoo.SharedModule()
    gm, _ = _rewritten(shared, codebook_dim=16)
    assert len(expansions(gm)) == 2
    assert sum(isinstance(m, RPQWeight) for m in gm.modules()) == 1


def test_rewrite_uses_the_seed():
    a, _ = _rewritten(MLP(), codebook_dim=16)
    b, _ = _rewritten(MLP(), codebook_dim=16)
    assert torch.equal(a.fc1.weight.codes, b.fc1.weight.codes)
    assert torch.equal(a.fc1.weight.codebooks, b.fc1.weight.codebooks)
    gm = capture(model := MLP())
    plans = plan_conversion(gm, model, RPQConfig(codebook_dim=16))
    rewrite(gm, plans, new_weights(plans, seed=1))
    assert not torch.equal(gm.fc1.weight.codes, a.fc1.weight.codes)


# ---------------------------------------------------------------------------------------------------
# checkpoint


def _checkpoint_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.utils.checkpoint.checkpoint]


@pytest.mark.parametrize("name", ["MLP", "ConvVariants", "TiedLM", "SharedModule", "Functional"])
def test_checkpoint_wraps_every_expansion(name, zoo):
    model = MLP() if name == "MLP" else getattr(zoo, name)()
    plain = rpq_fx.convert(model, codebook_dim=4)
    sites = len(expansions(plain))
    # reason: linear and embedding reads are fused (rpq_fx::linear / ::embedding, no dense weight); the rest expand
    fused = [n for n in plain.graph.nodes
             if n.target in (torch.ops.rpq_fx.linear.default, torch.ops.rpq_fx.embedding.default)]
    assert sites + len(fused) > 0
    gm = rpq_fx.convert(model, codebook_dim=4)
    wrapped = insert_checkpoints(gm)
    cleanup(gm)
    assert wrapped == sites
    assert not expansions(gm), "an expansion was left outside checkpointing"
    calls = _checkpoint_calls(gm)
    assert len(calls) == sites
    for call in calls:
        assert call.kwargs == {"use_reentrant": False}
        body = gm.get_submodule(call.args[0].target)
        assert len(expansions(body)) == 1
        ops = [n for n in body.graph.nodes if n.op == "call_function" and n.target is not EXPAND]
        assert len(ops) == 1, "the region is the expansion and the op that reads it"
    # convert(checkpoint=True) does the same
    assert len(_checkpoint_calls(rpq_fx.convert(model, codebook_dim=4, checkpoint=True))) == sites


def _grads(gm, inputs):
    gm.zero_grad()
    out = gm(*inputs)
    loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in
               (out if isinstance(out, tuple) else (out,)))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": x.grad.clone() for i, x in enumerate(inputs) if x.grad is not None})
    for x in inputs:
        x.grad = None
    return out, grads


@pytest.mark.parametrize("name", ["MLP", "ConvVariants", "TiedLM"])
def test_checkpoint_gradients_equal_plain(name, zoo):
    model = MLP() if name == "MLP" else getattr(zoo, name)()
    if name == "MLP":
        inputs = (torch.randn(4, 128, requires_grad=True),)
    elif name == "ConvVariants":
        inputs = tuple(t.requires_grad_() for t in zoo.conv_inputs())
    else:
        inputs = (torch.randint(0, 1000, (2, 9)),)
    plain = rpq_fx.convert(model, codebook_dim=4)
    ckpt = rpq_fx.convert(model, codebook_dim=4, checkpoint=True)
    out_plain, g_plain = _grads(plain, inputs)
    out_ckpt, g_ckpt = _grads(ckpt, inputs)
    torch.testing.assert_close(out_ckpt, out_plain)
    assert g_plain.keys() == g_ckpt.keys()
    assert any(k.endswith("codebooks") for k in g_plain)
    for key in g_plain:
        assert g_plain[key].abs().sum() > 0, key
        torch.testing.assert_close(g_ckpt[key], g_plain[key], rtol=1e-5, atol=1e-6, msg=key)


def _saved_for_backward(model, x):
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return saved


def test_checkpoint_drops_saved_bytes():
    model = MLP()
    x = torch.randn(4, 128, requires_grad=True)
    plain = _saved_for_backward(rpq_fx.convert(model, codebook_dim=64), x)
    ckpt = _saved_for_backward(rpq_fx.convert(model, codebook_dim=64, checkpoint=True), x)
    dense_shapes = {(512, 128), (512, 512), (10, 512)}
    # reason: linear layers are fused into rpq_fx::linear, which keeps no dense weight, checkpointed or not
    assert not dense_shapes & {shape for shape, _ in plain}, "a fused linear layer keeps no dense weight"
    assert not dense_shapes & {shape for shape, _ in ckpt}, "with checkpointing no dense weight is kept"
    plain_bytes, ckpt_bytes = sum(b for _, b in plain), sum(b for _, b in ckpt)
    assert ckpt_bytes <= plain_bytes, (plain_bytes, ckpt_bytes)


# ---------------------------------------------------------------------------------------------------
# cleanup


def test_cleanup_drops_unused_get_attr_and_submodules():
    model = MLP()
    gm = rpq_fx.convert(model, codebook_dim=16)
    out = gm(x := torch.randn(2, 128))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        gm.graph.get_attr("fc1.bias")
    gm.add_submodule("orphan", nn.Linear(3, 3))
    assert any(n.op == "get_attr" and not n.users for n in gm.graph.nodes)
    cleanup(gm)
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    assert not hasattr(gm, "orphan")
    gm.graph.lint()
    torch.testing.assert_close(gm(x), out, rtol=0, atol=0)


def test_cleanup_keeps_unread_in_place_ops():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 512)

        def forward(self, x):
            y = self.fc(x)
            y.mul_(2)  # result unread: a dead-code pass must not drop it
            return y

    model = InPlace()
    gm = rpq_fx.convert(model, codebook_dim=16)
    assert any(n.target == "mul_" for n in gm.graph.nodes)
    reference = rpq_fx.decompress(gm)["fc.weight"]
    x = torch.randn(3, 64)
    torch.testing.assert_close(gm(x), 2 * F.linear(x, reference, model.fc.bias))


@pytest.mark.parametrize("checkpoint", [False, True])
def test_converted_graphs_are_clean(checkpoint, zoo):
    for model in (zoo.LeNet(), zoo.TiedLM(), zoo.Functional(), zoo.ConvVariants(), MLP()):
        gm = rpq_fx.convert(model, codebook_dim=4, checkpoint=checkpoint)
        gm.graph.lint()
        unread = [n.name for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
        assert not unread, unread
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                assert isinstance(operator.attrgetter(node.target)(gm), (torch.Tensor, nn.Module))
        # the generated code is what runs
        assert gm.code == gm.graph.python_code("self").src


def test_printed_graph_shows_named_expansions(zoo):
    net = zoo.LeNet()
    gm = rpq_fx.convert(net, num_codebooks=5)
    text = gm.print_readable(print_output=False)
    # reason: the fuse pass turns expand -> F.linear into one rpq_fx::linear node, which nothing needs to checkpoint
    assert "fc1 = torch.ops.rpq_fx.linear.default(view, fc1_weight_codebooks, fc1_weight_codes, fc1_bias)" in text
    assert "self.fc1.weight.codebooks" in text and "self.fc1.weight.codes" in text
    ckpt = rpq_fx.convert(net, num_codebooks=5, checkpoint=True).print_readable(print_output=False)
    assert "fc1 = torch.ops.rpq_fx.linear.default(view, fc1_weight_codebooks, fc1_weight_codes, fc1_bias)" in ckpt
    assert "checkpoint" not in ckpt
