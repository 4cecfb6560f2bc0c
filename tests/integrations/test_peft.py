"""PEFT LoRA on RPQ layers: adapters train with the RPQ weights frozen, against a hand-computed reference
(the dense weight expanded independently, plus scaling * B A); the adapter saves and loads; merging is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import rpq_fx
from conftest import reference_expand
from rpq_fx.nn import RPQLinear

peft = pytest.importorskip("peft")
from rpq_fx.integrations.peft import RPQLoraLinear, RPQMergeError, from_pretrained, register  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = RPQLinear(32, 300, 4)
        self.fc2 = RPQLinear(300, 10, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _reference(layer: RPQLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRA layer's output from its parts: the RPQ weight expanded by indexing, and the adapter's matrices."""
    base = layer.base_layer
    dense = reference_expand(base.weight.codebooks.detach(), base.weight.codes)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return F.linear(x, dense, base.bias.detach()) + layer.scaling["default"] * (x @ a.t() @ b.t())


def _config(**options) -> "peft.LoraConfig":
    # init_lora_weights=False: B random, not zero, so that the adapter's term is seen from the first call
    return register(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False,
                                    **options))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 9), in_c=st.sampled_from([(12, 3), (20, 5), (36, 4)]), out=st.integers(1, 40),
       r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_lora_layer_matches_the_dense_weight_plus_the_adapter(batch, in_c, out, r, seed):
    torch.manual_seed(seed)
    in_features, num_codebooks = in_c
    model = nn.Sequential(RPQLinear(in_features, out, num_codebooks))
    peft_model = peft.get_peft_model(model, register(peft.LoraConfig(r=r, target_modules=["0"],
                                                                      init_lora_weights=False)))
    layer = peft_model.base_model.model[0]
    assert isinstance(layer, RPQLoraLinear) and (layer.in_features, layer.out_features) == (in_features, out)
    x = torch.randn(batch, in_features)
    torch.testing.assert_close(peft_model(x), _reference(layer, x))


def test_lora_trains_the_adapters_only_and_the_rpq_weights_stay_frozen():
    net = Net()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    peft_model = peft.get_peft_model(net, _config())
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    x, target = torch.randn(16, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.cross_entropy(peft_model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    state = {k.replace(".base_layer", ""): v for k, v in peft_model.base_model.model.state_dict().items()
             if "lora_" not in k}
    assert state.keys() == frozen.keys()
    for name, value in frozen.items():  # codebooks, codes and biases bit for bit
        assert torch.equal(state[name], value), name
    hidden = F.relu(_reference(peft_model.base_model.model.fc1, x))
    torch.testing.assert_close(peft_model(x), _reference(peft_model.base_model.model.fc2, hidden))

    with torch.autocast("cpu", torch.bfloat16):  # mixed precision: the RPQ op and the adapter both cast
        out = peft_model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), peft_model(x), rtol=5e-2, atol=5e-2)


def test_adapter_saves_and_loads_on_the_converted_model(tmp_path):
    net = Net()
    base = copy.deepcopy(net)
    peft_model = peft.get_peft_model(net, _config())
    x = torch.randn(5, 32)
    expected = peft_model(x).detach()
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not supported"):  # what from_pretrained spares the user: no mapping saved
        peft.PeftModel.from_pretrained(Net(), tmp_path)


def test_merge_is_refused_and_leaves_the_model_working_and_unload_gives_the_rpq_layers():
    peft_model = peft.get_peft_model(Net(), _config())
    x = torch.randn(5, 32)
    before = peft_model(x).detach()
    with pytest.raises(RPQMergeError, match="cannot merge LoRA"):
        peft_model.merge_and_unload()
    torch.testing.assert_close(peft_model(x), before, rtol=0, atol=0)
    plain = peft_model.unload()
    assert isinstance(plain.fc1, RPQLinear) and isinstance(plain.fc2, RPQLinear)
    dense = [reference_expand(m.weight.codebooks.detach(), m.weight.codes) for m in (plain.fc1, plain.fc2)]
    torch.testing.assert_close(plain(x), F.linear(F.relu(F.linear(x, dense[0], plain.fc1.bias)), dense[1],
                                                  plain.fc2.bias))


def test_lora_options_that_touch_the_dense_weight_are_refused():
    with pytest.raises(ValueError, match="use_dora=True is not supported on RPQ layers"):
        peft.get_peft_model(Net(), _config(use_dora=True))


def test_lora_on_a_converted_llama_trains_saves_and_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        vocab_size=512, max_position_embeddings=64))
    converted = rpq_fx.convert(model, codebook_dim=16, num_codes=16, progress=False)
    assert isinstance(converted.model.layers[0].self_attn.q_proj, RPQLinear)
    base = copy.deepcopy(converted)
    config = register(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model = peft.get_peft_model(converted, config)
    assert sum(isinstance(m, RPQLoraLinear) for m in peft_model.modules()) == 4
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    frozen = dict(base.named_parameters())
    for name, p in peft_model.base_model.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=tokens).logits
    peft_model.save_pretrained(tmp_path)
    loaded = from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, expected, rtol=0, atol=0)
    assert loaded.generate(tokens[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
