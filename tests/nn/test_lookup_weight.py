"""An ``nn.Embedding`` subclass with its own forward (OPT's positional embedding) reads only the rows it looks up.

Converted in place, such a layer runs its own forward through ``functional_call`` with a ``LookupWeight`` for its
weight: the lookup is ``rpq_fx::embedding`` on the codes. Every result is compared with a dense reference: the
original module holding the decompressed weight (``conftest.dense_reference``), gradients to the codebooks with the
dense weight's gradient summed into the codewords by plain indexing (``conftest.codebook_gradient``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx.nn.weight import LookupWeight, RPQWeight

from conftest import LargestTensor, assert_outputs_close, codebook_gradient, dense_reference, reference_expand

ROWS, DIM = 600, 32


class Positions(nn.Embedding):
    """Positions from a mask unless given (a ``None`` default, so fx cannot trace it without fixing the branch),
    then ``super().forward``: the shape of OPT's ``OPTLearnedPositionalEmbedding``."""

    def forward(self, mask, past: int = 0, positions=None):
        if positions is None:
            positions = (mask.cumsum(1) * mask - 1).long()[:, past:]
        return super().forward(positions + 2)


class Direct(nn.Embedding):
    """Looks up with ``F.embedding(x, self.weight)`` itself, and also reads the weight whole (a tied projection)."""

    def forward(self, x, scale=None):
        rows = F.embedding(x, self.weight, padding_idx=self.padding_idx)
        return rows if scale is None else rows @ self.weight.t() * scale


class Model(nn.Module):
    def __init__(self, layer: nn.Embedding):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(DIM, 3)

    def forward(self, *args):
        if args[0].sum() < 0:  # reason: untraceable whole, so convert goes module by module (as for HF models)
            return args[0]
        return self.head(self.layer(*args))


def _convert(model: nn.Module, **kwargs) -> nn.Module:
    return rpq_fx.convert(model, num_codebooks=4, progress=False, **kwargs)


def _lookups(converted: nn.Module) -> list[str]:
    return [n.name for m in converted.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if getattr(n.target, "__name__", "") == "lookup_weight"]


def _codebook_grads_match(converted: nn.Module, reference: nn.Module, name: str) -> None:
    """The codebooks' gradient equals the reference's dense gradient of ``name`` summed into the codewords."""
    weight = next(w for n, w in converted.named_modules() if isinstance(w, RPQWeight) and n.startswith(name))
    dense = reference.get_parameter(f"{name}.weight").grad
    assert dense is not None and dense.abs().sum() > 0
    expected = codebook_gradient(dense, weight.codes, weight.codebooks.shape[0], weight.num_codes)
    torch.testing.assert_close(weight.codebooks.grad, expected, rtol=1e-5, atol=1e-6)


def _training_case(seed: int):
    """A converted positions model, its dense reference and a padding mask (the first row half padding)."""
    torch.manual_seed(seed)
    original = Model(Positions(ROWS, DIM))
    converted = _convert(original)
    reference = dense_reference(original, converted, leftovers=True)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    return converted, reference, mask


@pytest.mark.parametrize("inplace", [False, True])
def test_subclass_forward_in_place_conversion_reads_rows_only(inplace):
    torch.manual_seed(0)
    original = Model(Positions(ROWS, DIM))
    model = copy.deepcopy(original) if inplace else original
    converted = _convert(model, inplace=inplace)
    assert _lookups(converted) == ["weight_lookup"]
    reference = dense_reference(original, converted)
    mask = torch.ones(2, 9, dtype=torch.long)
    with LargestTensor() as seen:
        actual = converted(mask, 3)
    assert seen.largest < ROWS * DIM // 4, "the whole positional table was expanded for a lookup of 6 rows"
    assert_outputs_close(actual, reference(mask, 3))
    positions = torch.tensor([[5, 0, 597]])
    assert_outputs_close(converted(mask, 0, positions), reference(mask, 0, positions))


def test_training_gradients_reach_the_codebooks():
    converted, reference, mask = _training_case(1)
    converted(mask, 2).square().sum().backward()
    reference(mask, 2).square().sum().backward()
    _codebook_grads_match(converted, reference, "layer")


def test_other_uses_expand_and_padding_rows_get_no_gradient():
    torch.manual_seed(2)
    original = Model(Direct(ROWS, DIM, padding_idx=7))
    converted = _convert(original)
    assert _lookups(converted)
    reference = dense_reference(original, converted, leftovers=True)
    tokens = torch.tensor([[7, 1, 599, 7], [3, 3, 0, 12]])
    for args in ((tokens,), (tokens, 0.5)):
        for model in (converted, reference):
            model.zero_grad()
        actual, expected = converted.layer(*args), reference.layer(*args)
        assert_outputs_close(actual, expected)
        actual.sum().backward()
        expected.sum().backward()
        _codebook_grads_match(converted, reference, "layer")


def test_whole_model_capture_traces_into_the_subclass():
    """fx traces a user's embedding subclass (not a leaf): its lookup becomes ``rpq_fx::embedding`` in the graph."""

    class Traceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.head = Direct(ROWS, DIM), nn.Linear(DIM, 3)

        def forward(self, x):
            return self.head(self.layer(x))

    torch.manual_seed(3)
    original = Traceable()
    converted = _convert(original, capture="fx")
    assert torch.ops.rpq_fx.embedding.default in [n.target for n in converted.graph.nodes]
    reference = dense_reference(original, converted, leftovers=True)
    tokens = torch.tensor([[4, 599, 0]])
    assert_outputs_close(converted(tokens), reference(tokens))
    converted(tokens).sum().backward()
    reference(tokens).sum().backward()
    _codebook_grads_match(converted, reference, "layer")


def test_lookup_weight_metadata_without_expanding():
    weight = RPQWeight(4, 8, 300)
    lookup = LookupWeight(weight)
    with LargestTensor() as seen:
        facts = (lookup.shape, lookup.dtype, lookup.device, lookup.size(0), lookup.dim(), lookup.requires_grad)
    assert facts == (torch.Size([300, 32]), torch.float32, torch.device("cpu"), 300, 2, True)
    assert seen.largest == 0
    assert "LookupWeight(num_codebooks=4" in repr(lookup)


@settings(max_examples=25, deadline=None)
@given(codebooks=st.integers(1, 4), dim=st.sampled_from([1, 3, 8]), rows=st.integers(2, 70),
       num_codes=st.sampled_from([4, 256]), shared=st.booleans(), shape=st.sampled_from([(5,), (2, 3), (1, 2, 4)]),
       padding=st.booleans(), seed=st.integers(0, 2**16), aten=st.booleans())
def test_lookup_matches_the_expanded_weight(codebooks, dim, rows, num_codes, shared, shape, padding, seed, aten):
    """``F.embedding`` / ``torch.embedding`` on a LookupWeight: values and codebook gradients equal plain indexing's."""
    gen = torch.Generator().manual_seed(seed)
    weight = RPQWeight(codebooks, dim, rows, num_codes, shared)
    weight.reset_parameters(generator=gen)
    indices = torch.randint(0, rows, shape, generator=gen)
    padding_idx = int(indices.reshape(-1)[0]) - rows if padding else None  # negative, as users may write it
    dense = reference_expand(weight.codebooks.detach(), weight.codes).requires_grad_(True)
    if aten:  # reason: aten takes padding_idx as given (F.embedding makes it non-negative first)
        padding_idx = -1 if padding_idx is None else padding_idx + rows * (seed % 2)
        actual = torch.embedding(LookupWeight(weight), indices, padding_idx)
        expected = torch.embedding(dense, indices, padding_idx)
    else:
        actual = F.embedding(indices, LookupWeight(weight), padding_idx)
        expected = F.embedding(indices, dense, padding_idx)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    grad = torch.randn(expected.shape, generator=gen)
    actual.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(weight.codebooks.grad, codebook_gradient(dense.grad, weight.codes,
                                                                        weight.codebooks.shape[0], num_codes),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["additive", "hot"])
def test_lookup_of_additive_and_hot_weights(kind):
    torch.manual_seed(4)
    options = {"additive_codebooks": 2} if kind == "additive" else {"hot_rows": 5, "hot_codebook_dim": 4}
    weight = RPQWeight(4, 8, 40, 16, **options)
    for part in weight.parts():
        torch.nn.init.normal_(part.codebooks)  # reason: the stages and hot residuals start at zero
    indices = torch.tensor([[0, 1, 2, 39], [5, 0, 7, 1]])
    actual = F.embedding(indices, LookupWeight(weight))
    assert_outputs_close(actual, F.embedding(indices, weight()))
    actual.sum().backward()
    grads = [p.grad.clone() for p in weight.parameters()]
    weight.zero_grad()
    F.embedding(indices, weight()).sum().backward()
    for got, want in zip(grads, [p.grad for p in weight.parameters()]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_subclass_padding_row_starts_at_zero(inplace):
    """Random init zeroes the padding row of a subclass run by its own forward, as it does nn.Embedding's: the dense
    weight's padding row is zero (and only it), and a lookup of it is a zero vector."""
    torch.manual_seed(5)
    converted = _convert(Model(Direct(ROWS, DIM, padding_idx=-3)), inplace=inplace)  # nn.Embedding: ROWS - 3
    dense = next(w for w in converted.modules() if isinstance(w, RPQWeight))()
    assert dense[ROWS - 3].abs().max() == 0 and dense.abs().sum(1).gt(0).sum() == ROWS - 1
    assert converted.layer(torch.tensor([[ROWS - 3, 0]]))[0, 0].abs().max() == 0


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"sparse": True}])
def test_a_subclass_that_renormalises_or_gives_sparse_gradients_stays_dense(options):
    """``max_norm`` rewrites looked-up rows in place and ``sparse`` gives sparse gradients: the subclass's weight
    stays dense, with the built-in layer's reason, and the model computes as before."""
    torch.manual_seed(6)
    original = Model(Positions(ROWS, DIM, **options))
    reference = copy.deepcopy(original)
    converted = _convert(original)
    assert not any(isinstance(w, RPQWeight) for w in converted.modules() if w is not converted.head)
    reasons = {layer.name: layer.reason or "" for layer in converted.rpq_layers}
    assert any("max_norm" in r or "sparse" in r for r in reasons.values()), reasons
    mask = torch.ones(1, 5, dtype=torch.long)
    assert_outputs_close(converted.layer(mask), reference.layer(mask))


def _recording(graphs: list):
    """A ``torch.compile`` backend that keeps each graph dynamo captured and runs it as captured."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _targets(graphs: list) -> set:
    return {node.target for gm in graphs for node in gm.graph.nodes}


def test_compiles_without_a_graph_break():
    """``torch.compile(fullgraph=True)`` (which raises at any graph break) of the converted layer: one graph, the
    lookup in it as ``rpq_fx::embedding`` and no expansion; inductor's code computes what eager and the dense
    reference compute."""
    torch.manual_seed(7)
    original = Model(Positions(ROWS, DIM))
    converted = _convert(original)
    reference = dense_reference(original, converted)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        captured = torch.compile(converted.layer, backend=_recording(graphs), fullgraph=True)(mask, 3)
        torch._dynamo.reset()
        inductor = torch.compile(converted.layer, fullgraph=True)(mask, 3)
        eager, expected = converted.layer(mask, 3), reference.layer(mask, 3)
    assert len(graphs) == 1
    assert torch.ops.rpq_fx.embedding.default in _targets(graphs)
    assert torch.ops.rpq_fx.expand.default not in _targets(graphs)
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch.testing.assert_close(inductor, eager)
    assert_outputs_close(inductor, expected)


def test_compiled_training_gradients_reach_the_codebooks():
    """Backward through the compiled layer (AOT autograd, one graph): the codebooks get the dense reference's
    gradient summed into their codewords."""
    converted, reference, mask = _training_case(8)
    torch._dynamo.reset()
    compiled = torch.compile(converted.layer, backend="aot_eager", fullgraph=True)
    converted.head(compiled(mask, 2)).square().sum().backward()
    reference(mask, 2).square().sum().backward()
    _codebook_grads_match(converted, reference, "layer")


def test_metadata_follows_the_weight():
    """Where the weight lives and whether it trains come from the RPQ weight, not from the values-less stand-in."""
    weight = RPQWeight(4, 8, 300).requires_grad_(False)
    lookup = LookupWeight(weight)
    assert (lookup.device, lookup.is_cpu, lookup.is_meta, lookup.get_device(), lookup.requires_grad) == (
        torch.device("cpu"), True, False, -1, False)
    weight.requires_grad_(True)
    with torch.no_grad():
        assert not LookupWeight(weight).requires_grad
    with torch.device("meta"):
        assert LookupWeight(RPQWeight(4, 8, 300)).is_meta


def test_exports_with_the_lookup_as_one_op(tmp_path):
    """``torch.export`` (strict, dynamo's capture) of the converted layer keeps the lookup as one ``rpq_fx::embedding``
    (the wrapper subclass stopped it); the ONNX export built on it computes in onnxruntime what eager computes."""
    torch.manual_seed(9)
    converted = _convert(Model(Positions(ROWS, DIM))).eval()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    program = torch.export.export(converted.layer, (mask,), strict=True)
    targets = [n.target for n in program.graph.nodes]
    assert targets.count(torch.ops.rpq_fx.embedding.default) == 1 and torch.ops.rpq_fx.expand.default not in targets
    with torch.no_grad():
        eager = converted.layer(mask)
        torch.testing.assert_close(program.module()(mask), eager, rtol=0, atol=0)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from rpq_fx.onnx_export import export_onnx

    path = export_onnx(converted.layer, (mask,), tmp_path / "positions.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: mask.numpy()})
    torch.testing.assert_close(torch.from_numpy(actual), eager)
