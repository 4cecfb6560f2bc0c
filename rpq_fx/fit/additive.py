"""Fit an RPQ weight of M additive stages (``additive_codebooks``): residual fits, then coordinate descent.

The objective of every fit here (``||W - Ŵ||²``, row-weighted, or ``tr(Δ H Δᵀ)`` for the Gram matrix ``H``
of the layer's inputs) is a quadratic in ``Ŵ``, so with ``Ŵ = Σ_m Ŵ_m`` fitting stage ``m`` while the
others hold is the same problem as fitting one weight to the residual ``W - Σ_{j≠m} Ŵ_j``, under the
same ``H`` / row weights (AQLM's and residual vector quantization's observation). Each stage is fitted
with :func:`~rpq_fx.fit.quantize.fit_rows`, the single-stage machinery: stage 1 on ``W``, stage m on
what the stages before it leave, then rounds of refitting each stage on ``W`` minus all the others,
a refit kept only where it lowers the objective, until a round gains less than ``_MIN_GAIN``.
"""

import torch
from torch import Tensor

from ..ops import expand
from .quantize import FitResult, fit_rows, row_errors

__all__ = ["fit_additive", "REFINE_ROUNDS"]

REFINE_ROUNDS = 2  # rounds of refitting every stage on the others' residual, at most
# reason: a refit draws a fresh k-means start; gains below this share of the objective are noise, not progress
_MIN_GAIN = 1e-3


def _rows(result: FitResult) -> Tensor:
    """A stage's expanded rows ``[N, C*d]`` in float32."""
    return expand(result.codebooks.float(), result.codes)


def _objective(delta: Tensor, hessian: Tensor | None, row_weights: Tensor | None) -> float:
    return float(row_errors(delta, hessian, row_weights).sum())


@torch.no_grad()
def fit_additive(rows: Tensor, stages: int, num_codebooks: int, num_codes: int, shared: bool, *,
                 hessian: Tensor | None = None, row_weights: Tensor | None = None, error_feedback: bool = True,
                 damp: float, seed: int = 0, rounds: int = REFINE_ROUNDS) -> tuple[list[FitResult], float]:
    """Fit ``stages`` codebook-and-code pairs whose expansions sum to ``rows [N, C*d]`` (arguments as
    :func:`fit_rows`'s); returns the stages' fits and the objective relative to an all-zero weight's.
    ``hessian`` is read, never overwritten."""
    rows = rows.detach().float()

    def fit(target: Tensor, m: int, r: int) -> FitResult:
        # reason: each (stage, round) its own seed, so a refit is a new start rather than the same one again
        return fit_rows(target, num_codebooks, num_codes, shared, hessian=hessian, row_weights=row_weights,
                        error_feedback=error_feedback, damp=damp, seed=seed + 1000 * r + m)

    results, expanded = [], []
    residual = rows.clone()
    for m in range(stages):
        results.append(fit(residual, m, 0))
        expanded.append(_rows(results[-1]))
        residual -= expanded[-1]
    error = _objective(residual, hessian, row_weights)
    for r in range(1, rounds + 1):
        before = error
        for m in range(stages):
            residual += expanded[m]  # W minus every stage but m
            candidate = fit(residual, m, r)
            candidate_rows = _rows(candidate)
            candidate_error = _objective(residual - candidate_rows, hessian, row_weights)
            if candidate_error < error:
                results[m], expanded[m], error = candidate, candidate_rows, candidate_error
            residual -= expanded[m]
        if before - error <= _MIN_GAIN * before:
            break
    total = _objective(rows, hessian, row_weights)
    return results, error / total if total > 0 else 0.0
