"""Fit one planned weight (``init="kmeans"``) to its layer's trained values: :func:`fit_layer`, which
:func:`~rpq_fx.fit.fit_weights` and the block-by-block fits (:mod:`rpq_fx.fit.sequential`) run for each weight."""

import torch
from torch import Tensor

from ..errors import RPQConversionError
from ..nn.weight import RPQWeight
from ..record import FitOutcome, LayerPlan
from .additive import fit_additive
from .calibrate import LayerStats
from .quantize import FitResult, fit_rows, row_errors

__all__ = ["fit_layer"]

# reason: the cross-covariance is noisy where inputs are few for their width: the target's ridge is H's mean diagonal
# (on MiniLM's 2.0-bit allocation, mean cosine with 256 calibration lines: 0.01 of it 0.907, 0.1 0.909, 1 0.926,
# 3 0.923, 10 0.923, 0.918 without; with 9216 lines 0.01 0.956, 1 0.954, 0.944 without; a ridge shrinking with the
# number of inputs, 4 or 10 x row length / inputs, 0.921 with 256 lines)
_TARGET_RIDGE = 1.0


def _asymmetric_target(rows: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The weight ``W*`` whose output on the inputs the quantised layers before it give (their Gram
    matrix ``H``) best matches the dense model's, ridge-regularised toward ``W``: ``W* (H + λI) =
    W C + λ W``, ``C = Σ x_dense xᵀ``, ``λ`` = ``H``'s mean diagonal; fitting ``tr((Ŵ - W*) H (Ŵ - W*)ᵀ)``
    is then fitting the dense output (GPTAQ's asymmetric calibration)."""
    # reason: float32 products, as the fit's (the ridge keeps H + λI well conditioned): float64 is 2.5x slower
    ridge = _TARGET_RIDGE * float(hessian.diagonal().mean())
    diagonal = hessian.diagonal().clone()
    hessian.diagonal().add_(ridge)  # reason: in place and back, not a copy of H (a layer's size for a square one)
    try:
        factor = torch.linalg.cholesky(hessian.float())
    finally:
        hessian.diagonal().copy_(diagonal)
    right = (cross.float().t() @ rows.t().float()).add_(rows.t(), alpha=ridge)
    return torch.cholesky_solve(right, factor).t().to(rows.dtype)


def _fit_hot(plan: LayerPlan, weight: RPQWeight, rows: torch.Tensor, keep: torch.Tensor, hessian, row_weights,
             seed: int) -> float:
    """Give the rows whose error weighs most a residual code (``weight.hot``); the fit's relative error after it."""
    delta = rows[keep].double() - weight.expand_rows()[keep].double()
    errors = row_errors(delta, hessian, row_weights)
    chosen = errors.topk(plan.hot_rows).indices.sort().values
    hot = weight.hot
    result = fit_rows(delta[chosen], hot.num_codebooks, hot.num_codes, True, hessian=hessian,
                      row_weights=None if row_weights is None else row_weights[chosen],
                      error_feedback=plan.settings.error_feedback, damp=plan.settings.damp, seed=seed)
    weight.hot_index.copy_(keep.nonzero()[chosen, 0].to(torch.int32))
    hot.codes.copy_(result.codes.to(hot.codes.dtype))
    hot.codebooks.copy_(result.codebooks.to(hot.codebooks.dtype))
    total = row_errors(rows[keep], hessian, row_weights).sum()
    left = row_errors(rows[keep].double() - weight.expand_rows()[keep].double(), hessian, row_weights).sum()
    return float(left / total) if total > 0 else 0.0


def _refuse_non_finite(name: str, tensor: Tensor, what: str, hint: str) -> None:
    """Raise naming layer ``name`` if ``tensor`` holds a NaN or an infinity (one reduction when it does not)."""
    # reason: sum(dtype=torch.float64) builds a float64 copy of the tensor first (2x a float32 layer)
    if torch.isfinite(tensor.sum()):
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count == 0:  # reason: finite values can still sum past their dtype's largest value
        return
    first = bad.nonzero()[0].tolist()
    raise RPQConversionError(f"convert: init='kmeans' cannot fit '{name}': {what} holds {count} non-finite "
                             f"value{'s' if count > 1 else ''} of {tensor.numel()} (the first, "
                             f"{tensor[tuple(first)].item()}, at {first}); {hint}")


def _write(weight: RPQWeight, result: FitResult, keep: Tensor, plan: LayerPlan, num_codes: int) -> None:
    """Put a fit of the kept rows into ``weight`` (one stage); padding rows read the reserved zero codeword."""
    if plan.padding_rows:  # int16 keeps codes >= 32768 as bit patterns
        weight.codes[:, ~keep] = torch.tensor(plan.settings.num_codes - 1).to(weight.codes.dtype)
        weight.codes[:, keep] = result.codes
    else:
        weight.codes.copy_(result.codes)
    weight.codebooks[:, :num_codes] = result.codebooks.to(weight.codebooks.dtype)
    weight.codebooks[:, num_codes:] = 0


@torch.no_grad()
def fit_layer(plan: LayerPlan, weight: RPQWeight, stats: LayerStats | None, seed: int) -> FitOutcome:
    """Fit ``weight`` to ``plan.param`` and say how it was filled; padding rows (``padding_idx``) keep their
    reserved zero codeword. A weight of several additive stages is fitted by
    :func:`~rpq_fx.fit.additive.fit_additive`. The Gram matrices of ``stats`` are taken (set to None) as they
    are read."""
    param, settings = plan.param, plan.settings
    if param.is_meta:
        raise RPQConversionError(f"convert: init='kmeans' fits '{plan.name}' to its trained values, but it is on the "
                                 "meta device; build the model with its weights, or use init='random'")
    _refuse_non_finite(plan.name, param, "its weight", "repair or skip that layer, or use init='random'")
    if stats is not None:
        item = "" if stats.non_finite_item is None else f" (first in calibration item {stats.non_finite_item})"
        for what, value in (("the Gram matrix of its calibration inputs", stats.hessian),
                            ("the cross-covariance of its calibration inputs", stats.cross)):
            if value is not None:
                _refuse_non_finite(plan.name, value, what, f"its input is NaN or infinite{item}: a calibration "
                                   "input, or what the layers before it compute from one; check the calibration inputs")
    rows = (param.t() if plan.transposed else param).reshape(plan.rows_shape[0], -1)
    keep = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    keep[list(plan.padding_rows)] = False
    hessian = row_weights = None
    if stats is not None and stats.hessian is not None:
        # reason: the fit computes in float32; letting the sums go as they are read saves a copy of the Gram matrix
        hessian, stats.hessian = stats.hessian.to(rows.device, torch.float32), None
        if settings.asymmetric and stats.cross is not None:
            cross, stats.cross = stats.cross, None
            rows = _asymmetric_target(rows, hessian, cross.to(rows.device))
            del cross
    elif stats is not None:
        counts = stats.row_counts.to(rows.device)[keep]
        row_weights = counts + counts.sum() / counts.numel()  # reason: rows unseen in calibration still count
    kept = rows[keep] if plan.padding_rows else rows  # reason: a mask always copies; most weights have no padding
    num_codes = settings.num_codes - bool(plan.padding_rows)
    if weight.additive is None:
        # reason: H is this fit's own; only the hot rows' fit reads it afterwards
        result = fit_rows(kept, plan.num_codebooks, num_codes, settings.shared_codebooks, hessian=hessian,
                          row_weights=row_weights, error_feedback=settings.error_feedback, damp=settings.damp,
                          seed=seed, overwrite_hessian=weight.hot is None)
        results, error = [result], result.error
    else:
        results, error = fit_additive(kept, weight.additive_codebooks, plan.num_codebooks, num_codes,
                                      settings.shared_codebooks, hessian=hessian, row_weights=row_weights,
                                      error_feedback=settings.error_feedback, damp=settings.damp, seed=seed)
    for stage, result in zip(weight.stages(), results):
        _write(stage, result, keep, plan, num_codes)
    error = error if weight.hot is None else _fit_hot(plan, weight, rows, keep, hessian, row_weights, seed)
    return FitOutcome("kmeans+calibration" if stats is not None else "kmeans", error)
