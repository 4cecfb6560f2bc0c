"""Fine-tuning a converted model: distil the dense teacher's outputs into its codebooks.

Codes stay fixed (they are buffers); the codebooks and, by default, the dense leftovers (biases,
norms) train. :func:`param_groups` gives the parameter groups for any torch optimizer,
:func:`float32_codebooks` the float32 master copies that float16 / bfloat16 codebooks train in;
:func:`finetune` is the whole loop with AdamW.
"""

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._model import model_device, run_inputs, training_mode
from .config import check_int
from .fit.calibrate import padding_mask
from .loss import default_loss, distillation_loss, mean_loss, model_output
from .nn.weight import RPQWeight

__all__ = ["param_groups", "float32_codebooks", "finetune"]


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


def finetune(model: nn.Module, teacher: nn.Module, data: Iterable, *, steps: int = 100, lr: float = 1e-4,
             loss: Callable | None = None, layers: Sequence[str] = (), layer_weight: float = 1.0,
             validation: Iterable | None = None, validate_every: int = 10,
             optimizer: torch.optim.Optimizer | None = None, train_dense: bool = True,
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
    """
    check_int("finetune", "steps", steps, 1)
    check_int("finetune", "validate_every", validate_every, 1)
    items = data if isinstance(data, Sequence) else list(data)
    held_out = None if validation is None else validation if isinstance(validation, Sequence) else list(validation)
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
        best = _Best([p for group in optimizer.param_groups for p in group["params"]])
        if held_out is not None:
            with torch.no_grad():
                held_targets = [run_inputs(teacher, x, device) for x in held_out]
            teacher_layers.values = {}
            best.offer(mean_loss(model, held_out, held_targets, objective, device))
        for step in tqdm(range(steps), desc="rpq_fx finetune", unit="step", delay=2, disable=not progress):
            index = step % len(items)
            if index not in targets:
                with torch.no_grad():
                    out = run_inputs(teacher, items[index], device)
                    targets[index] = (out, [t.detach() for t in teacher_layers.take(layers, "teacher")])
            optimizer.zero_grad(set_to_none=True)
            out, inner = targets[index]
            value = objective(run_inputs(model, items[index], device), out, items[index])
            if layers:
                pairs = zip(student_layers.take(layers, "converted model"), inner)
                mask = padding_mask(items[index])
                value = value + layer_weight * sum(distillation_loss(s, t, mask) for s, t in pairs) / len(layers)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
            if held_out is not None and ((step + 1) % validate_every == 0 or step + 1 == steps):
                best.offer(mean_loss(model, held_out, held_targets, objective, device))
                student_layers.values = {}
        if held_out is not None:
            best.restore()
    return losses
