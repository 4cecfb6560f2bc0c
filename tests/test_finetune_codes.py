"""PV-tuning's discrete step (``finetune(code_every=...)``): codes re-picked along the loss gradient."""

import copy
import functools

import pytest
import torch
from torch import nn

import rpq_fx
from rpq_fx.finetune import code_step
from rpq_fx.loss import default_loss
from rpq_fx.nn.weight import rpq_weights


def mlp(vocab: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Embedding(300, 32, padding_idx=0)] if vocab else []
    return nn.Sequential(*layers, nn.Linear(32, 288), nn.Tanh(), nn.Linear(288, 300)).eval()


@functools.cache
def _converted(vocab: bool, m: int) -> nn.Module:
    return rpq_fx.convert(mlp(vocab), codebook_dim=4, num_codes=16, shared_codebooks=True, init="kmeans",
                          additive_codebooks=m, progress=False)


def convert(vocab: bool, m: int) -> nn.Module:
    """A fresh copy of ``mlp(vocab)`` converted with M = ``m`` stages (fitted once per module)."""
    return copy.deepcopy(_converted(vocab, m))


def codes_of(model):
    return [s.codes.clone() for _, w in rpq_weights(model) for s in w.stages()]


def dense_reference(teacher, converted):
    """``teacher``'s architecture with the converted model's weights: stages summed here by plain indexing."""
    reference = copy.deepcopy(teacher)
    state = reference.state_dict()
    for name, w in rpq_weights(converted):
        group = torch.arange(w.num_codebooks)[:, None] if w.codebooks.shape[0] > 1 else torch.zeros(
            w.num_codebooks, 1, dtype=torch.long)
        state[name] = sum(s.codebooks[group, s.codes.long()].permute(1, 0, 2).reshape(w.num_vectors, -1)
                          for s in w.stages()).detach()
    state.update({k: v for k, v in converted.state_dict().items() if k in state and "weight" not in k})
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("m", [1, 2])
def test_a_kept_step_changes_codes_and_lowers_the_loss_an_undone_one_changes_nothing(m):
    teacher = mlp()
    student = convert(False, m)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = teacher(x)
    kept = 0
    for size in (0.3, 0.1, 0.03, 0.01):
        codes = codes_of(student)
        before, after, changed = code_step(student, teacher, x, target, default_loss, None, step=size)
        assert before == pytest.approx(float(default_loss(dense_reference(teacher, student)(x), target, x)), rel=1e-5,
                                       abs=1e-7) or changed
        if changed:
            kept += 1
            assert after < before and sum(int((a != b).sum()) for a, b in zip(codes, codes_of(student))) == changed
            with torch.no_grad():  # the model computes with the new codes: against an independent dense reference
                torch.testing.assert_close(student(x), dense_reference(teacher, student)(x), atol=1e-5, rtol=1e-5)
            assert float(default_loss(student(x), target, x)) == pytest.approx(after, rel=1e-5)
        else:
            assert after >= before and all(torch.equal(a, b) for a, b in zip(codes, codes_of(student)))
    assert kept, "no step size lowered the loss"


def test_a_padding_row_keeps_its_zero_codeword():
    teacher = mlp(vocab=True)
    student = convert(True, 2)
    ids = torch.randint(1, 300, (8, 12), generator=torch.Generator().manual_seed(2))
    ids[:, -3:] = 0
    with torch.no_grad():
        target = teacher(ids)
    for size in (0.3, 0.1, 0.03):
        code_step(student, teacher, ids, target, default_loss, None, step=size)
    weight = student.get_submodule("0.weight")
    for stage in weight.stages():
        assert (stage.codes[:, 0] == 15).all() and (stage.codes[:, 1:] != 15).all()
    assert not weight.expand_rows()[0].any()


def test_finetune_with_code_steps_changes_codes_and_ends_no_worse():
    teacher = mlp()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(32, 32, generator=g) for _ in range(4)]
    validation = [torch.randn(32, 32, generator=g) for _ in range(2)]
    student = convert(False, 2)
    start = codes_of(student)

    def loss_on(model):
        with torch.no_grad():
            return sum(float(default_loss(model(v), teacher(v), v)) for v in validation) / len(validation)

    initial = loss_on(student)
    rpq_fx.finetune(student, teacher, data, steps=8, lr=1e-3, validation=validation, validate_every=2,
                    code_every=2, code_step_size=0.2, code_fraction=0.01, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(start, codes_of(student)))
    assert loss_on(student) <= initial
    with torch.no_grad():  # the best state put back holds codebooks and codes of one step, consistent
        torch.testing.assert_close(student(validation[0]), dense_reference(teacher, student)(validation[0]),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="code_every must be an int >= 1, got 0"):
        rpq_fx.finetune(student, teacher, data, steps=1, code_every=0, progress=False)
