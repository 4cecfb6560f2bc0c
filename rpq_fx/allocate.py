"""``allocate``: the size of each weight, for a budget of bits per weight, by what each one costs the model.

:func:`size_costs` fits every weight at every candidate size (one ``convert`` per size) and puts
each fitted weight alone into the dense model to measure what it costs the output on the
calibration inputs (:func:`distillation_loss`). Taking the costs of different weights as additive,
:meth:`SizeCosts.config` finds the sizes that minimise their sum within a budget by a Lagrangian
search (each weight takes the size minimising ``cost + λ · bits``, ``λ`` the smallest that fits)
and returns them as an :class:`RPQConfig` with one override per weight; the costs are measured
once for any number of budgets. :func:`allocate` is both in one call.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ._model import model_device, run_inputs, training_mode
from ._progress import progress_bar
from .config import SIZE_SETTINGS, SPLITS, RPQConfig, check_float
from .convert import FilterFn, convert
from .decompress import decompress
from .fit.sequential import BlockReplay, block_split
from .loss import default_loss, mean_loss
from .report import report

__all__ = ["allocate", "size_costs", "SizeCosts", "SizeOption", "DEFAULT_SIZES"]

DEFAULT_SIZES = tuple({"codebook_dim": d} for d in (8, 6, 4, 3, 2))  # 1 to 4 code bits per weight at 256 codes


@dataclass
class SizeOption:
    """One candidate size of one weight, as :func:`size_costs` measured it."""

    size: dict
    bits: float  # stored bits, all of the weight's values
    cost: float  # the model's output loss with this weight alone fitted at this size


def _choose(options: dict[str, list[SizeOption]], budget: float) -> dict[str, SizeOption]:
    """Per weight the option minimising ``cost + λ · bits`` for the smallest ``λ`` within ``budget`` bits."""
    def pick(lam: float) -> dict[str, SizeOption]:
        return {name: min(found, key=lambda o: (o.cost + lam * o.bits, o.bits)) for name, found in options.items()}

    def bits(chosen: dict[str, SizeOption]) -> float:
        return sum(o.bits for o in chosen.values())

    low, high = 0.0, 1e-12
    if bits(pick(low)) <= budget:
        return pick(low)
    while bits(pick(high)) > budget:  # ends: at a large enough λ every weight takes its fewest bits
        high *= 4
    for _ in range(100):  # reason: bisection on λ; the chosen sizes change only at finitely many λ
        middle = (low + high) / 2
        low, high = (low, middle) if bits(pick(middle)) <= budget else (middle, high)
    return pick(high)


def _check_bits(bits) -> None:
    check_float("allocate", "bits", bits, 0, low_open=True)


@dataclass
class SizeCosts:
    """What each weight costs the model at each candidate size (:func:`size_costs`): configs for any budget."""

    base: RPQConfig  # the settings every size was applied on top of
    sizes: list[dict]
    options: dict[str, list[SizeOption]]  # weight name -> one option per size
    values: dict[str, int]  # weight name -> its number of values

    @property
    def smallest_bits(self) -> float:
        """Bits per weight with every weight at its fewest: the smallest budget :meth:`config` accepts."""
        return sum(min(o.bits for o in found) for found in self.options.values()) / sum(self.values.values())

    def config(self, bits: float) -> RPQConfig:
        """The sizes of least total cost within ``bits`` stored bits per converted weight, as an
        :class:`RPQConfig` (the base config's settings and overrides, one more override per weight)."""
        _check_bits(bits)
        if self.smallest_bits > bits:
            raise ValueError(f"allocate: the smallest sizes take {self.smallest_bits:.3f} bits per weight, above the "
                             f"budget of {bits}")
        chosen = _choose(self.options, bits * sum(self.values.values()))
        # reason: a setting one size sets and another leaves to the base (hot_rows) is spelled out in every override
        varied = {key for size in self.sizes for key in size} - set(SPLITS)
        base = self.base.to_dict()
        overrides = {name: {**{key: base[key] for key in varied}, **o.size} for name, o in chosen.items()}
        return replace(self.base.with_settings(self.sizes[0]), overrides={**self.base.overrides, **overrides})


def _costs(model: nn.Module, items: Sequence, targets: list, swaps: dict[str, dict[str, torch.Tensor]],
           blocks: str | None) -> dict[str, float]:
    """What each swap (weight name -> the model's parameters it replaces) costs ``model``'s output on
    ``items`` (:func:`default_loss` against ``targets``). With ``blocks`` (:func:`block_split`) a swap
    inside them runs the model from the first block it touches on, the blocks before it replaying
    the dense model's outputs there (:class:`BlockReplay`): the same output, without running them."""
    if blocks is None:
        return {name: mean_loss(model, items, targets, default_loss, model_device(model), replaced)
                for name, replaced in swaps.items()}
    prefix = f"{blocks}."

    def first(replaced: dict[str, torch.Tensor]) -> int:
        # reason: a weight outside the blocks (an embedding before them, a head after them) runs the whole model
        return min(int(name[len(prefix):].partition(".")[0]) if name.startswith(prefix) else 0 for name in replaced)

    costs = {}
    with BlockReplay(model, blocks, items) as replay:
        for name, replaced in sorted(swaps.items(), key=lambda swap: first(swap[1])):
            while replay.start < first(replaced):
                replay.advance()
            costs[name] = sum(float(default_loss(replay.run(i, replaced), target, item))
                              for i, (item, target) in enumerate(zip(items, targets))) / len(items)
    return costs


@torch.no_grad()
def size_costs(model: nn.Module, calibration: Iterable, *, sizes: Sequence[dict] = DEFAULT_SIZES,
               config: RPQConfig | None = None, filter_fn: FilterFn | None = None,
               validation: Iterable | None = None, progress: bool = True) -> SizeCosts:
    """Fit every weight ``convert`` would convert at each of ``sizes`` and measure what it costs
    ``model``'s output on ``calibration`` alone; ``.config(bits)`` then allocates any budget.

    ``sizes`` are the candidate settings of every weight (``{"codebook_dim": 4}``, ``{"codebook_dim":
    2, "num_codes": 16}``), each applied on top of ``config`` (default: one shared codebook per
    weight, ``init="kmeans"``), whose other settings and overrides stay; ``calibration`` as for
    :func:`convert`. ``validation``: other inputs to measure the costs on (default: the calibration
    inputs). A fit is best on the inputs it was fitted to, hot rows most of all (they are the rows
    those inputs look up), so costs measured there favour it. It costs one data-aware conversion
    per size and, per weight and size, one pass of the model over the inputs costs are measured on
    (from the weight's block on, where the model's blocks allow: :func:`~rpq_fx.fit.sequential.block_split`).
    The model is left as it was.
    """
    if not sizes or not all(isinstance(size, dict) for size in sizes):
        raise ValueError(f"allocate: sizes must be a non-empty sequence of dicts of settings, got {sizes!r}")
    unknown = sorted({key for size in sizes for key in size} - set(SIZE_SETTINGS))
    if unknown:
        raise ValueError(f"allocate: sizes hold unknown settings {unknown}; accepted: {list(SIZE_SETTINGS)}")
    items = list(calibration)
    measured = items if validation is None else list(validation)
    if not items:
        raise ValueError("allocate: calibration is empty; the weights are fitted on it")
    if not measured:
        raise ValueError("allocate: validation is empty; the costs are measured on it")
    base = config or RPQConfig(codebook_dim=4, shared_codebooks=True, init="kmeans")
    candidates = [base.with_settings(size) for size in sizes]
    device = model_device(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    options: dict[str, list[SizeOption]] = {}
    values: dict[str, int] = {}
    blocks = block_split(model, measured[0])
    with training_mode(model, False):
        targets = [run_inputs(model, item, device) for item in measured]
        for size, candidate in zip(progress_bar(sizes, desc="rpq_fx allocate", unit="size", enabled=progress), candidates):
            converted = convert(model, config=candidate, calibration=items, filter_fn=filter_fn, progress=False)
            dense = decompress(converted)
            swaps, bits = {}, {}
            for row in report(converted).rows:
                if row["init"] is None:
                    continue
                value = dense[row["layer"]]
                replaced = {name: v for name, v in dense.items() if v is value and name in params}
                if not replaced:  # reason: a cost measured on the untouched model would be 0, and wrong
                    raise RuntimeError(f"allocate: no parameter of the model is named like the weight '{row['layer']}'")
                values[row["layer"]] = value.numel()
                swaps[row["layer"]], bits[row["layer"]] = replaced, row["bits/w"] * value.numel()
            costs = _costs(model, measured, targets, swaps, blocks)
            for name in swaps:
                options.setdefault(name, []).append(SizeOption(size, bits[name], costs[name]))
    if not options:
        raise ValueError("allocate: no weight of the model was converted at any of the sizes")
    return SizeCosts(base, list(sizes), options, values)


def allocate(model: nn.Module, bits: float, calibration: Iterable, *, sizes: Sequence[dict] = DEFAULT_SIZES,
             config: RPQConfig | None = None, filter_fn: FilterFn | None = None, validation: Iterable | None = None,
             progress: bool = True) -> RPQConfig:
    """An :class:`RPQConfig` that converts ``model`` within ``bits`` stored bits per converted weight
    (codebooks and codes, as :func:`report` counts them), giving the bits where they cost the least:
    ``convert(model, config=allocate(model, 2.0, batches), calibration=batches)``.

    ``size_costs(model, calibration, ...).config(bits)`` (see :func:`size_costs` for the arguments);
    call that to allocate several budgets from one measurement.
    """
    _check_bits(bits)  # reason: before the minutes of measuring, not after (config checks it again)
    return size_costs(model, calibration, sizes=sizes, config=config, filter_fn=filter_fn, validation=validation,
                      progress=progress).config(bits)
