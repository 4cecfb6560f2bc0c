"""Fine-tuning a converted model: distil the dense teacher's outputs into its codebooks.

Codes stay fixed (they are buffers); the codebooks and, by default, the dense leftovers (biases,
norms) train. :func:`param_groups` gives the parameter groups for any torch optimizer,
:func:`float32_codebooks` the float32 master copies that float16 / bfloat16 codebooks train in;
:func:`finetune` is the whole loop with AdamW; :func:`code_step`, PV-tuning's discrete step on the codes,
is what its ``code_every`` adds.
"""

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._model import input_items, model_device, run_inputs, training_mode
from ._progress import progress_bar
from .config import check_float, check_int
from .decompress import decompress
from .distributed import (RPQDistributedError, average_gradients, check_codes_in_sync, check_in_sync,
                          is_data_parallel, is_sharded)
from .fit.calibrate import drop_padding, padding_mask
from .fit.repick import repick_codes
from .loss import default_loss, distillation_loss, mean_loss, model_output
from .nn.weight import RPQWeight, rpq_weights

__all__ = ["param_groups", "float32_codebooks", "finetune", "code_step"]


def _uses_per_codeword(weight: RPQWeight) -> float:
    """How many weight slices read each codeword, on average."""
    return weight.num_codebooks * weight.num_vectors / (weight.codebooks.shape[0] * weight.num_codes)


def param_groups(model: nn.Module, lr: float, *, adaptive: bool = True, train_dense: bool = True,
                 weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for ``torch.optim``: one per RPQ weight's codebooks, one for the dense leftovers.

    A codeword is read by many weight slices, so its gradient is the sum of theirs. With SGD
    (``adaptive=False``) each codebook's learning rate is divided by its slices per codeword, so a
    codeword moves by the mean of the steps its slices would take as dense weights: the same
    relative update. Adam-style optimizers normalise the gradient already (a codeword and a dense
    weight of equal size then take equal steps), so there the rate is ``lr`` unchanged. Codebooks
    get no weight decay. Codebooks stored in float16 / bfloat16: build and step the optimizer
    inside :func:`float32_codebooks`.
    """
    check_float("param_groups", "lr", lr, 0)
    check_float("param_groups", "weight_decay", weight_decay, 0)
    groups, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, RPQWeight) and id(module) not in seen:
            seen.add(id(module))
            scale = 1.0 if adaptive else 1.0 / _uses_per_codeword(module)
            groups.append({"params": [module.codebooks], "lr": lr * scale, "weight_decay": 0.0, "name": name})
    codebooks = {id(g["params"][0]) for g in groups}
    dense = [p for p in model.parameters() if id(p) not in codebooks and p.is_floating_point()]
    if train_dense and dense:
        groups.append({"params": dense, "lr": lr, "weight_decay": weight_decay, "name": "dense"})
    return groups


@contextlib.contextmanager
def float32_codebooks(model: nn.Module):
    """Within the block, codebooks stored below their layer's precision (float16 codebooks of a
    float32 layer) are held in that precision; on exit they are rounded back and their gradients
    dropped. Train them inside it, as mixed-precision training keeps float32 master weights: in
    float16 an optimizer's steps are mostly below the values' resolution, and Adam's ``eps`` of
    1e-8 is 0, so its first step divides 0 by 0. The Parameters stay the same objects."""
    low = []
    for weight in model.modules():
        if (isinstance(weight, RPQWeight) and weight.compute_dtype is not None
                and weight.compute_dtype.itemsize > weight.codebooks.dtype.itemsize):
            low.append((weight.codebooks, weight.codebooks.dtype))
            # reason: set through .data, the Parameter stays the object optimizers and param_groups hold
            weight.codebooks.data = weight.codebooks.data.to(weight.compute_dtype)
    try:
        yield
    finally:
        for codebooks, dtype in low:
            codebooks.data = codebooks.data.to(dtype)
            codebooks.grad = None


def code_step(model: nn.Module, teacher: nn.Module, item, target, objective: Callable, device, *,
              step: float, fraction: float = 1e-3, beam: int = 8) -> tuple[float, float, int]:
    """PV-tuning's discrete step (Malinovskii et al., 2024) on ``model``'s codes against ``teacher``'s output
    ``target`` on ``item``: the gradient of the loss with respect to each RPQ weight's dense value ``W`` (the
    teacher's architecture run on the converted model's dense weights, :func:`~rpq_fx.decompress`) gives a
    target ``W - η ∇W``, its move scaled to ``step`` of ``W``'s RMS, toward which
    :func:`~rpq_fx.fit.repick.repick_codes` moves the ``fraction`` of slices that gain most. The step is kept
    only if the loss on the same item drops; otherwise every code goes back. Returns the loss before, the
    loss with the new codes and how many codes changed (0 where the step was undone). Weights with hot rows
    keep their codes."""
    weights = {name: w for name, w in rpq_weights(model) if w.hot is None}
    with torch.no_grad():
        before = float(objective(run_inputs(model, item, device), target, item))
    dense = decompress(model)
    leaves = {id(v): v.detach().clone().requires_grad_() for v in dense.values()}
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    # reason: the converted model's trained dense leftovers (biases, norms) under the teacher's names, where they match
    swapped = {name: p for name, p in model.named_parameters()
               if name in teacher_params and teacher_params[name].shape == p.shape}
    swapped.update({name: leaves[id(value)] for name, value in dense.items() if name in teacher_params})
    loss = objective(run_inputs(teacher, item, device, swapped), target, item)
    loss.backward()
    saved = {name: [s.codes.clone() for s in w.stages()] for name, w in weights.items()}
    changed = 0
    with torch.no_grad():
        for name, weight in weights.items():
            grad = leaves[id(dense[name])].grad if name in dense else None
            if grad is None:  # reason: a weight the teacher does not hold under that name gets no gradient
                continue
            rows = weight.expand_rows().float()
            grad = (grad.t() if weight.transposed else grad).reshape(rows.shape).float()
            scale = step * rows.square().mean().sqrt() / grad.square().mean().sqrt().clamp_min(1e-30)
            changed += repick_codes(weight, rows - scale * grad, grad, beam=beam, fraction=fraction)
        after = float(objective(run_inputs(model, item, device), target, item)) if changed else before
        if after >= before:
            for name, codes in saved.items():
                for stage, value in zip(weights[name].stages(), codes):
                    stage.codes.copy_(value)
            return before, after, 0
    return before, after, changed


class _Outputs:
    """Forward hooks keeping the outputs of the named submodules of a model, in call order; removed
    when the ``with`` block that holds them ends."""

    def __init__(self, model: nn.Module, names: Sequence[str], which: str):
        self.values: dict[str, Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"finetune: the {which} has no submodule '{name}' (layers=)") from None
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: self.values.__setitem__(name, model_output(out))))

    def take(self, names: Sequence[str], which: str) -> list[Tensor]:
        missing = [name for name in names if name not in self.values]
        if missing:
            raise ValueError(f"finetune: layers {missing} were not called in the {which}; in a model captured as "
                             "one graph (torch.fx, torch.export) its submodules no longer run: name layers of a model "
                             "converted in place, or leave layers= empty")
        values, self.values = [self.values[name] for name in names], {}
        return values

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class _Best:
    """The trained parameters at the lowest validation loss seen, to put back at the end."""

    def __init__(self, params: list[Tensor]):
        self.params, self.loss, self.values = params, float("inf"), None

    def offer(self, loss: float) -> None:
        if loss < self.loss:
            self.loss, self.values = loss, [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, self.values or ()):
                p.copy_(value)


def _squares(student, teacher, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(sum (s - t)^2, sum t^2)`` over the kept positions: :func:`distillation_loss` is their ratio."""
    s, t = model_output(student), model_output(teacher)
    keep = None if mask is None else mask.bool()
    s, t = drop_padding(s, keep), drop_padding(t, keep)
    return (s - t).square().sum(), t.detach().square().sum()


class _Ranks:
    """Data-parallel finetuning over the ranks of the initialised process group, each on its own data.

    Every rank's loss is scaled so that the mean over ranks is the loss of one process on all the
    ranks' items of a step together: the default (relative) losses divide by the teacher's energy
    summed over the ranks; a ``loss=`` of your own is averaged over the ranks, which is that loss
    when it is a mean over equally sized shares. Gradients are averaged over the ranks by the
    wrapper (DDP, FSDP2) or, for a plain model, here."""

    def __init__(self, model: nn.Module, params: list[Tensor], custom_loss: bool, validation: int | None):
        self.world = dist.get_world_size()
        self.custom_loss = custom_loss
        self.wrapped = is_data_parallel(model) or is_sharded(model)
        self.params = params
        check_codes_in_sync(model, caller="finetune")
        if not self.wrapped:
            names = {id(p): name for name, p in model.named_parameters()}
            check_in_sync({names.get(id(p), f"parameter {i}"): p for i, p in enumerate(params)},
                          "finetune: the values of", "give every rank the same model (convert it the same way, or "
                          "load one checkpoint)")
        counts = [None] * self.world
        dist.all_gather_object(counts, validation)
        if len(set(counts)) > 1:
            raise RPQDistributedError(f"finetune: every rank needs as many validation items; the ranks hold {counts}")

    def step_loss(self, student, teacher, mask, pairs, layer_weight: float, objective, item) -> Tensor:
        """This rank's share of one step's loss (see the class)."""
        terms = [] if self.custom_loss else [_squares(student, teacher, mask)]
        terms += [_squares(s, t, mask) for s, t in pairs]
        relative = []
        if terms:
            energy = torch.stack([e for _, e in terms]).float()
            dist.all_reduce(energy)
            relative = [self.world * num / e.clamp_min(1e-12) for (num, _), e in zip(terms, energy)]
        value = objective(student, teacher, item) if self.custom_loss else relative.pop(0)
        return value + layer_weight * sum(relative) / len(pairs) if pairs else value

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total) / self.world

    def validation_loss(self, model, held_out, targets, objective, device) -> float:
        """The mean validation loss: per item over all ranks' items of that index (the default loss),
        or the mean over ranks of each rank's mean (a ``loss=`` of your own)."""
        if self.custom_loss:
            return self.mean(mean_loss(model, held_out, targets, objective, device))
        with torch.no_grad():
            sums = torch.stack([torch.stack(_squares(run_inputs(model, x, device), t, padding_mask(x))).float()
                                for x, t in zip(held_out, targets)])
        dist.all_reduce(sums)
        return float((sums[:, 0] / sums[:, 1].clamp_min(1e-12)).mean())

    def reduce(self) -> None:
        if not self.wrapped:
            average_gradients(self.params)


def _ranks(model, params, custom_loss: bool, validation) -> _Ranks | None:
    """A :class:`_Ranks` where a process group of more than one rank is initialised, else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return _Ranks(model, params, custom_loss, None if validation is None else len(validation))


def finetune(model: nn.Module, teacher: nn.Module, data: Iterable, *, steps: int = 100, lr: float = 1e-4,
             loss: Callable | None = None, layers: Sequence[str] = (), layer_weight: float = 1.0,
             validation: Iterable | None = None, validate_every: int = 10,
             optimizer: torch.optim.Optimizer | None = None, train_dense: bool = True,
             code_every: int | None = None, code_step_size: float = 0.05, code_fraction: float = 1e-3,
             progress: bool = True) -> list[float]:
    """Train ``model`` (converted) to reproduce ``teacher`` (the dense original) on ``data``; returns the losses.

    ``data`` holds model inputs as for ``convert(calibration=...)`` (tensors, tuples of positional
    inputs or dicts of keyword inputs), cycled until ``steps`` are done; the teacher's outputs are
    computed once per item. ``loss(student_output, teacher_output)`` defaults to
    :func:`distillation_loss`, padding positions (an item's ``attention_mask``) left out.
    ``layers`` names submodules (``"encoder.layer.3"``) whose outputs are distilled too, each by
    :func:`distillation_loss`, their mean weighted by ``layer_weight``: they must still run in the
    converted model (a model converted in place keeps them).
    ``validation``, other inputs, guards against overfitting: ``loss`` is measured on them before
    training and every ``validate_every`` steps, and the parameters at its lowest are put back at
    the end (so the model is never worse there than before). Both models run in eval mode (no
    dropout, BatchNorm statistics frozen) and get their modes back afterwards. Codes stay fixed;
    the codebooks and, with ``train_dense``, the other floating-point parameters train, with AdamW
    over :func:`param_groups` unless ``optimizer`` is given; float16 / bfloat16 codebooks train in
    float32 (:func:`float32_codebooks`).

    ``code_every`` (off by default) adds PV-tuning's discrete step: after every ``code_every``-th step the
    codes are re-picked toward the loss gradient's direction (a move of ``code_step_size`` of each weight's
    RMS; only the ``code_fraction`` of slices that gain most to first order) and kept only where the loss on
    that step's item drops (:func:`code_step`; ``layers`` do
    not enter it, weights with hot rows keep their codes, and the teacher must hold each weight under the
    name :func:`~rpq_fx.decompress` gives it, as a model converted in place does). The best state kept
    for ``validation`` then includes the codes. One process only.

    Distributed: where a ``torch.distributed`` process group of several ranks is initialised, every
    rank calls ``finetune`` with its own share of the data (``data`` and ``validation``: equally
    many validation items per rank) and the same model, plain or wrapped in DDP / FSDP2. Each step
    then trains on all the ranks' items of that step together: the same result, to float
    tolerance, as one process on the concatenated batches, with the default loss (its teacher
    energy summed over the ranks) and with a ``loss=`` that is a mean over equally sized shares
    (it is averaged over the ranks). Gradients are averaged over the ranks (by the wrapper, or
    here for a plain model); the returned losses are the ranks' mean, the same list on every rank.
    Codes, and a plain model's trained parameters, must be the same on every rank (checked).
    """
    check_int("finetune", "steps", steps, 1)
    check_int("finetune", "validate_every", validate_every, 1)
    if optimizer is None:  # reason: with an optimizer of the caller's, lr is not read
        check_float("finetune", "lr", lr, 0)
    check_float("finetune", "layer_weight", layer_weight, 0)
    if code_every is not None:
        check_int("finetune", "code_every", code_every, 1)
        check_float("finetune", "code_step_size", code_step_size, 0, low_open=True)
        check_float("finetune", "code_fraction", code_fraction, 0, 1, low_open=True)
    items = input_items(data, "finetune: data")
    held_out = None if validation is None else input_items(validation, "finetune: validation")
    if not items:
        raise ValueError("finetune: data is empty")
    if held_out is not None and not held_out:
        raise ValueError("finetune: validation is empty")
    # reason: the default loss leaves out padding positions (a dict item's attention_mask), as calibration does
    objective = (lambda s, t, item: loss(s, t)) if loss is not None else default_loss
    # reason: float16 codebooks train in float32 master copies
    with (float32_codebooks(model), training_mode(model, False), training_mode(teacher, False),
          _Outputs(model, layers, "converted model") as student_layers,
          _Outputs(teacher, layers, "teacher") as teacher_layers):
        optimizer = optimizer or torch.optim.AdamW(param_groups(model, lr, train_dense=train_dense))
        device = model_device(model)
        targets: dict[int, tuple] = {}
        losses = []
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        codes = [s.codes for _, w in rpq_weights(model) for s in w.stages()] if code_every else []
        best = _Best(trained + codes)  # reason: codebooks put back without the codes they trained with would not fit
        ranks = _ranks(model, trained, loss is not None, held_out)
        if ranks and code_every:
            raise RPQDistributedError("finetune: code_every= runs in one process; leave it None with several ranks")
        validate = ranks.validation_loss if ranks else mean_loss
        if held_out is not None:
            with torch.no_grad():
                held_targets = [run_inputs(teacher, x, device) for x in held_out]
            teacher_layers.values = {}
            best.offer(validate(model, held_out, held_targets, objective, device))
        for step in progress_bar(range(steps), desc="rpq_fx finetune", unit="step", delay=2, enabled=progress):
            index = step % len(items)
            if index not in targets:
                with torch.no_grad():
                    out = run_inputs(teacher, items[index], device)
                    targets[index] = (out, [t.detach() for t in teacher_layers.take(layers, "teacher")])
            optimizer.zero_grad(set_to_none=True)
            out, inner = targets[index]
            student = run_inputs(model, items[index], device)
            pairs = list(zip(student_layers.take(layers, "converted model"), inner)) if layers else []
            mask = padding_mask(items[index])
            if ranks:
                value = ranks.step_loss(student, out, mask, pairs, layer_weight, objective, items[index])
            else:
                value = objective(student, out, items[index])
                if pairs:
                    value = value + layer_weight * sum(distillation_loss(s, t, mask) for s, t in pairs) / len(pairs)
            value.backward()
            if ranks:
                ranks.reduce()
            optimizer.step()
            if code_every and (step + 1) % code_every == 0:
                code_step(model, teacher, items[index], out, objective, device, step=code_step_size,
                          fraction=code_fraction)
            losses.append(ranks.mean(float(value.detach())) if ranks else float(value.detach()))
            if held_out is not None and ((step + 1) % validate_every == 0 or step + 1 == steps):
                best.offer(validate(model, held_out, held_targets, objective, device))
                student_layers.values = {}
        if held_out is not None:
            best.restore()
    return losses
