"""finetune and param_groups: distillation trains codebooks (and dense leftovers), never codes or the teacher."""

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rpq_fx
from rpq_fx.finetune import _squares


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Dropout(0.2), nn.Linear(512, 300)).eval()


def test_finetune_lowers_the_held_out_distillation_loss_and_trains_only_codebooks_and_leftovers():
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, shared_codebooks=True, init="kmeans", progress=False).train()
    teacher_state = copy.deepcopy(teacher.state_dict())
    codes = {n: b.clone() for n, b in student.named_buffers()}
    codebooks = {n: p.clone() for n, p in student.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data, held_out = list(torch.randn(256, 32, generator=g).split(32)), torch.randn(512, 32, generator=g)
    with torch.no_grad():
        before = rpq_fx.distillation_loss(student.eval()(held_out), teacher(held_out))
    student.train()
    losses = rpq_fx.finetune(student, teacher, data, steps=60, lr=1e-3, progress=False)
    with torch.no_grad():
        after = rpq_fx.distillation_loss(student.eval()(held_out), teacher(held_out))
    assert len(losses) == 60 and losses[-1] < losses[0]
    assert after < 0.8 * before
    assert all(torch.equal(codes[n], b) for n, b in student.named_buffers()), "codes stay fixed"
    assert all(not torch.equal(codebooks[n], p) for n, p in student.named_parameters()), "every parameter trained"
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items()), "teacher untouched"
    student.train()
    rpq_fx.finetune(student, teacher, data[:1], steps=1, progress=False)
    assert student.training and not teacher.training, "modes are given back"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_codebooks_train_in_float32_and_are_stored_back_in_their_dtype(dtype):
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, shared_codebooks=True, init="kmeans", codebook_dtype=dtype,
                             progress=False)
    stored = {n: p for n, p in student.named_parameters() if n.endswith("codebooks")}
    before = {n: p.clone() for n, p in stored.items()}
    g = torch.Generator().manual_seed(1)
    data, held_out = list(torch.randn(256, 32, generator=g).split(32)), torch.randn(512, 32, generator=g)
    with torch.no_grad():
        start = rpq_fx.distillation_loss(student(held_out), teacher(held_out))
    losses = rpq_fx.finetune(student, teacher, data, steps=60, lr=1e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(losses))), "Adam on float16 codebooks divides 0 by 0"
    with torch.no_grad():
        assert rpq_fx.distillation_loss(student(held_out), teacher(held_out)) < 0.8 * start
    for name, p in student.named_parameters():
        if name in stored:
            assert p is stored[name] and p.dtype == dtype and p.grad is None and not torch.equal(p, before[name])
    weight = student.get_submodule("0.weight")
    with rpq_fx.float32_codebooks(student):
        assert weight.codebooks.dtype == torch.float32 and weight.codebooks is stored["0.weight.codebooks"]
    assert weight.codebooks.dtype == dtype


def test_validation_puts_back_the_parameters_at_the_lowest_held_out_loss():
    teacher = mlp()
    fitted = rpq_fx.convert(teacher, codebook_dim=8, shared_codebooks=True, init="kmeans", progress=False)
    g = torch.Generator().manual_seed(2)
    data, validation = list(torch.randn(64, 32, generator=g).split(32)), list(torch.randn(64, 32, generator=g).split(32))

    def held_out(model):
        with torch.no_grad():
            return sum(float(rpq_fx.distillation_loss(model(x), teacher(x))) for x in validation) / len(validation)

    start = held_out(fitted)
    blind, guarded = copy.deepcopy(fitted), copy.deepcopy(fitted)
    rpq_fx.finetune(blind, teacher, data, steps=12, lr=0.5, progress=False)  # a rate that wrecks the fit
    assert held_out(blind) > 2 * start
    rpq_fx.finetune(guarded, teacher, data, steps=12, lr=0.5, validation=validation, validate_every=4, progress=False)
    assert held_out(guarded) == pytest.approx(start), "no validated state beat the start: the start is put back"
    gentle = copy.deepcopy(fitted)
    rpq_fx.finetune(gentle, teacher, data, steps=20, lr=1e-3, validation=validation, validate_every=5, progress=False)
    assert held_out(gentle) < start, "an improving run keeps its improvement"
    with pytest.raises(ValueError, match="validate_every must be an int >= 1, got 0"):
        rpq_fx.finetune(gentle, teacher, data, steps=1, validation=validation, validate_every=0)
    with pytest.raises(ValueError, match="validation is empty"):
        rpq_fx.finetune(gentle, teacher, data, steps=1, validation=[])


def test_param_groups_hold_every_codebook_once_with_sgd_rates_scaled_by_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 64)
            self.head = nn.Linear(64, 1000)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    rpq = rpq_fx.convert(Tied(), codebook_dim=8, progress=False)
    groups = rpq_fx.param_groups(rpq, 0.1, adaptive=False)
    codebook_groups = [g for g in groups if g["name"] != "dense"]
    assert len(codebook_groups) == 1, "a tied weight is one RPQ weight, one group"
    weight = rpq.embed.weight
    uses = weight.num_codebooks * weight.num_vectors / (weight.codebooks.shape[0] * weight.num_codes)
    assert codebook_groups[0]["params"][0] is weight.codebooks and codebook_groups[0]["lr"] == pytest.approx(0.1 / uses)
    assert [p for g in groups if g["name"] == "dense" for p in g["params"]] == [rpq.head.bias]
    adaptive = rpq_fx.param_groups(rpq, 0.1, train_dense=False)
    assert [g["lr"] for g in adaptive] == [0.1] and len(adaptive) == 1
    torch.optim.SGD(groups).step()  # the groups are plain torch param groups


def test_finetune_refuses_bad_arguments():
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        rpq_fx.finetune(student, teacher, [torch.randn(2, 32)], steps=0)
    with pytest.raises(ValueError, match="data is empty"):
        rpq_fx.finetune(student, teacher, [], steps=1)
    with pytest.raises(ValueError, match="code_every must be an int >= 1, got 0"):
        rpq_fx.finetune(student, teacher, [torch.randn(2, 32)], steps=1, code_every=0)


_NOT_FINITE = [float("nan"), float("inf"), float("-inf"), True, "0.1", None]


@pytest.mark.parametrize("name, value, accepted", [
    *[("lr", v, "a number >= 0") for v in (*_NOT_FINITE, -1e-3)],
    *[("layer_weight", v, "a number >= 0") for v in (*_NOT_FINITE, -1)],
    *[("code_step_size", v, "a number > 0") for v in (*_NOT_FINITE, 0, -1)],
    *[("code_fraction", v, "a number in (0, 1]") for v in (*_NOT_FINITE, 0, 1.5)]])
def test_finetune_refuses_each_bad_float_naming_it_before_touching_the_model(name, value, accepted):
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, progress=False)
    before = copy.deepcopy(student.state_dict())
    codes = {"code_every": 1} if name.startswith("code_") else {}
    with pytest.raises(ValueError, match=re.escape(f"finetune: {name} must be {accepted}, got {value!r}")):
        rpq_fx.finetune(student, teacher, [torch.randn(2, 32)], steps=1, progress=False, **codes, **{name: value})
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_finetune_reads_lr_only_where_it_builds_the_optimizer():
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, progress=False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    assert len(rpq_fx.finetune(student, teacher, [torch.randn(2, 32)], steps=1, lr=float("nan"),
                               optimizer=optimizer, progress=False)) == 1


@pytest.mark.parametrize("name, value", [("lr", float("nan")), ("lr", -1), ("weight_decay", float("inf")),
                                         ("weight_decay", -0.1), ("lr", True)])
def test_param_groups_refuse_bad_rates(name, value):
    student = rpq_fx.convert(mlp(), codebook_dim=8, progress=False)
    rates = {"lr": 0.1, **{name: value}}
    with pytest.raises(ValueError, match=re.escape(f"param_groups: {name} must be a number >= 0, got {value!r}")):
        rpq_fx.param_groups(student, **rates)


def test_per_layer_distillation_on_a_model_converted_in_place_and_a_clear_error_where_layers_are_gone():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=600, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=512, max_position_embeddings=32)
    teacher = transformers.BertModel(config).eval()
    student = rpq_fx.convert(teacher, codebook_dim=8, shared_codebooks=True, init="kmeans", progress=False)
    data = [{"input_ids": torch.randint(0, 600, (4, 10), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    losses = rpq_fx.finetune(student, teacher, data, steps=24, lr=1e-3, layers=["encoder.layer.0"], progress=False)
    assert losses[-1] < 0.7 * losses[0]
    assert not any(m._forward_hooks for m in (*student.modules(), *teacher.modules())), "hooks are removed"
    flat_teacher = mlp()
    flat = rpq_fx.convert(flat_teacher, codebook_dim=8, progress=False)  # one fx graph: its submodules never run
    with pytest.raises(ValueError, match=r"layers \['0'\] were not called in the converted model"):
        rpq_fx.finetune(flat, flat_teacher, [torch.randn(2, 32)], steps=1, layers=["0"], progress=False)


def test_the_default_loss_leaves_padding_positions_out():
    teacher = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    student = teacher.clone()
    student[1, 2] = 100.0  # a padding position: whatever it holds must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert rpq_fx.distillation_loss(student, teacher, mask) == 0
    assert rpq_fx.distillation_loss(student, teacher) > 0


def test_finetune_leaves_the_global_generator_alone():
    teacher = mlp()
    student = rpq_fx.convert(teacher, codebook_dim=8, shared_codebooks=True, progress=False).train()
    g = torch.Generator().manual_seed(1)
    data, held_out = list(torch.randn(64, 32, generator=g).split(32)), [torch.randn(16, 32, generator=g)]
    state = torch.random.get_rng_state()
    rpq_fx.finetune(student, teacher, data, steps=3, validation=held_out, validate_every=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(2, 6), length=st.integers(1, 5), cut=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_the_default_loss_of_a_batch_splits_into_sums_over_its_shards(batch, length, cut, seed):
    """What distributed finetune relies on: distillation_loss of the whole batch is the ranks' summed
    squared errors over their summed teacher energies, padding left out."""
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(batch, length, 3, generator=g), torch.randn(batch, length, 3, generator=g)
    mask = torch.rand(batch, length, generator=g) > 0.3
    mask[:, 0] = True  # reason: every sequence keeps its first token, as tokenizers' masks do
    cut = min(cut, batch - 1)
    shards = [_squares(student[part], teacher[part], mask[part]) for part in (slice(0, cut), slice(cut, None))]
    whole = rpq_fx.distillation_loss(student, teacher, mask)
    torch.testing.assert_close(sum(e for e, _ in shards) / sum(t for _, t in shards), whole)
    assert sum(e for e, _ in shards) / sum(t for _, t in shards) != sum(e / t for e, t in shards) / 2, \
        "the mean of the shards' own losses is not the loss of the whole"
