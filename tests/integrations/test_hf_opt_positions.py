"""OPT's positional embedding (transformers' ``OPTLearnedPositionalEmbedding``, an ``nn.Embedding`` subclass with
its own forward) reads only the positions it looks up: forward, greedy generation with the KV cache, and backward
in train mode, each against the dense reference (the original model holding the decompressed weights)."""

import pytest
import torch

import rpq_fx
from rpq_fx.nn.weight import RPQWeight

from conftest import LargestTensor, assert_outputs_close, codebook_gradient, dense_reference

transformers = pytest.importorskip("transformers")

POSITIONS = "model.decoder.embed_positions"


@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                    num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    original = transformers.OPTForCausalLM(config).eval()
    converted = rpq_fx.convert(original, num_codebooks=4, progress=False)
    assert type(original.get_submodule(POSITIONS)).__name__ == "OPTLearnedPositionalEmbedding"
    assert POSITIONS + ".weight" in {a for layer in converted.rpq_layers if layer.converted for a in layer.aliases}
    return original, converted, dense_reference(original, converted)


def test_forward_expands_no_positional_table(opt):
    _, converted, reference = opt
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    table = converted.get_submodule(POSITIONS + ".weight").shape
    with torch.no_grad(), LargestTensor() as seen:
        actual = converted(ids).logits
    assert seen.largest < table[0] * table[1], "the whole positional table was expanded"
    with torch.no_grad():
        assert_outputs_close(actual, reference(ids).logits)


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_with_the_kv_cache(opt, cache):
    _, converted, reference = opt
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=6, do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True,
                   cache_implementation=cache)
    actual, expected = converted.generate(ids, **options), reference.generate(ids, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_outputs_close(torch.stack(actual.scores), torch.stack(expected.scores))


def test_training_gradients_of_the_positions(opt):
    _, converted, reference = opt
    ids = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    converted.train(), reference.train()
    try:
        for model in (converted, reference):
            model.zero_grad()
            model(ids, labels=ids).loss.backward()
    finally:
        converted.eval(), reference.eval()
    weight = converted.get_submodule(POSITIONS + ".weight")
    assert isinstance(weight, RPQWeight)
    dense = reference.get_parameter(POSITIONS + ".weight").grad
    assert dense.abs().sum() > 0
    expected = codebook_gradient(dense, weight.codes, weight.codebooks.shape[0], weight.num_codes)
    torch.testing.assert_close(weight.codebooks.grad, expected, rtol=1e-4, atol=1e-6)


def test_compiles_whole_without_a_graph_break(opt):
    """``torch.compile(fullgraph=True)`` of the whole converted OPT (raises at any graph break; the positional
    table's LookupWeight broke it before): one graph, both embeddings looked up as ``rpq_fx::embedding``, nothing
    expanded; it computes what eager and the dense reference compute."""
    _, converted, reference = opt
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        actual = torch.compile(converted, backend=recording, fullgraph=True)(ids).logits
        eager, expected = converted(ids).logits, reference(ids).logits
    torch._dynamo.reset()
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert len(graphs) == 1
    assert targets.count(torch.ops.rpq_fx.embedding.default) == 2 and torch.ops.rpq_fx.expand.default not in targets
    torch.testing.assert_close(actual, eager, rtol=0, atol=0)
    assert_outputs_close(actual, expected)
