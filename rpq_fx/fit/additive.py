"""Fit an RPQ weight of M additive stages (``additive_codebooks``): residual fits, then a joint search (AQLM's).

The objective of every fit here (``||W - Ŵ||²``, row-weighted, or ``tr(Δ H Δᵀ)`` for the Gram matrix ``H``
of the layer's inputs) is a quadratic in ``Ŵ = Σ_m Ŵ_m``. The fit starts greedy: stage 1 fitted to ``W``
by :func:`~rpq_fx.fit.quantize.fit_rows` (the single-stage machinery), stage m to what the stages before
it leave, then rounds of refitting each stage on ``W`` minus all the others (kept where the objective
drops); or, where it scores lower, the product quantizer of slices ``d / M`` long written as M stages (the
same weight: the joint steps then start from one codebook's fit at the same bits of codes). Then it
alternates, as AQLM does, two steps that each lower the objective of all stages together:

- codes (:func:`search_codes`): slice by slice, each row's M codes are chosen together, by beam search
  over the stages (the slice's target in the metric of ``H``'s diagonal block, with the error the row's
  other slices leave pulled in through ``H``'s off-diagonal blocks, as coordinate descent on the codes does
  for one stage), starting from the current codes, so no row's objective rises;
- codebooks (:func:`solve_codebooks`): every stage's codebooks solved at once by least squares for the
  chosen codes (``H``-weighted: conjugate gradients on the normal equations of the M-times-wider layer whose
  input is M copies of ``x``, its Gram matrix ``H`` tiled M x M; row-weighted or plain: the normal
  equations, ``M K`` unknowns per codebook group, solved directly).
"""

import torch
from torch import Tensor

from ..nn.weight import code_dtype
from ..ops import expand
from .quantize import FitResult, fit_rows, least_squares_codebooks, row_errors

__all__ = ["fit_additive", "search_codes", "solve_codebooks", "beam_codes", "REFINE_ROUNDS", "JOINT_ROUNDS", "BEAM"]

# reason: after the joint steps two rounds of refits gained 0.2% of the objective for 40% more time (a 768 x 384
# layer, d=8 M=2: relative error 0.05997 without, 0.05984 with)
REFINE_ROUNDS = 0  # rounds of refitting every stage on the others' residual, at most
JOINT_ROUNDS = 4  # rounds of the joint code search and codebook solve, at most
BEAM = 8  # candidate code tuples kept per row and slice by the beam search (AQLM's default beam size is 8)
# reason: a refit draws a fresh k-means start; gains below this share of the objective are noise, not progress
_MIN_GAIN = 1e-3
_BEAM_ELEMENTS = 2**22  # the beam search scores about this many (point, candidate, codeword) triples at a time
_CG_ITERS = 24  # conjugate-gradient iterations of the H-weighted codebook solve, at most
_RIDGE = 1e-6  # of the normal matrix's mean diagonal: keeps unused codewords where they are, solves stay defined


def _rows(result: FitResult) -> Tensor:
    """A stage's expanded rows ``[N, C*d]`` in float32."""
    return expand(result.codebooks.float(), result.codes)


def _objective(delta: Tensor, hessian: Tensor | None, row_weights: Tensor | None) -> float:
    return float(row_errors(delta, hessian, row_weights).sum())


def _summed(codebooks: list[Tensor], codes: Tensor) -> Tensor:
    """``Σ_m expand(codebooks[m], codes[m])``, ``[N, C*d]`` float32; ``codes [M, C, N]`` long."""
    small = codes.to(code_dtype(codebooks[0].shape[1]))
    return sum(expand(cb.float(), small[m].contiguous()) for m, cb in enumerate(codebooks))


def beam_codes(points: Tensor, words: Tensor, codes: Tensor, beam: int = BEAM) -> Tensor:
    """The M codes of each point whose codewords sum nearest to it (squared distance), found by beam search.

    ``points [P, d]``; ``words [M, K, d]`` (stage m's codewords); ``codes [P, M]`` (long), the current codes,
    where the search starts. One sweep over the stages: for each candidate tuple of the beam, stage m's code
    is replaced by each of the K codewords, and the ``beam`` best of the tuples so made are kept (a
    candidate's stage-m alternatives are skipped where an earlier candidate differs from it only there, so
    the beam holds no duplicates). The best candidate never sums farther from its point than the current
    codes (they are among the first step's tuples); where rounding says otherwise the current codes are kept.
    Returns ``[P, M]`` long."""
    p, d = points.shape
    stages, k, _ = words.shape
    points, words = points.float(), words.float()
    norms = words.square().sum(-1)  # [M, K]
    stage_index = torch.arange(stages, device=points.device)
    out = torch.empty_like(codes)
    step = max(1, _BEAM_ELEMENTS // (beam * k * max(d, 4)))
    for start in range(0, p, step):
        x, current = points[start:start + step], codes[start:start + step]
        tuples = current.unsqueeze(1)  # [P, B, M]
        sums = words[stage_index, current].sum(1).unsqueeze(1)  # [P, B, d]
        for m in range(stages):
            width = tuples.shape[1]
            rest = sums - words[m][tuples[..., m]]
            target = x.unsqueeze(1) - rest  # what stage m is to stand for, per candidate
            scores = torch.baddbmm(norms[m].expand(target.shape[0], width, k), target, words[m].t().expand(
                target.shape[0], d, k), alpha=-2) + target.square().sum(-1, keepdim=True)
            if width > 1 and stages > 1:
                others = torch.cat([tuples[..., :m], tuples[..., m + 1:]], -1)
                same = (others.unsqueeze(2) == others.unsqueeze(1)).all(-1)  # [P, B, B]
                earlier = torch.ones(width, width, dtype=torch.bool, device=x.device).tril(-1)
                scores.masked_fill_((same & earlier).any(-1).unsqueeze(-1), float("inf"))
            best = scores.view(scores.shape[0], -1).topk(min(beam, width * k), dim=1, largest=False).indices
            source, word = best // k, best % k
            tuples = tuples.gather(1, source.unsqueeze(-1).expand(-1, -1, stages)).clone()
            tuples[..., m] = word
            sums = rest.gather(1, source.unsqueeze(-1).expand(-1, -1, d)) + words[m][word]
        final = (x.unsqueeze(1) - sums).square().sum(-1)  # [P, B], recomputed exactly
        chosen = final.argmin(1)
        found = tuples[torch.arange(tuples.shape[0], device=x.device), chosen]
        before = (x - words[stage_index, current].sum(1)).square().sum(-1)
        out[start:start + step] = torch.where((final.gather(1, chosen.unsqueeze(1))[:, 0] < before).unsqueeze(1),
                                              found, current)
    return out


def _words(codebooks: list[Tensor], c: int) -> Tensor:
    """``[M, K, d]``: the codewords slice ``c`` reads in each stage."""
    return torch.stack([cb[c if cb.shape[0] > 1 else 0] for cb in codebooks]).float()


def _column_blocks(width: int, d: int) -> list[tuple[int, int]]:
    """Blocks of whole slices about 128 columns wide: ``Δ H`` is computed once per block and kept current in it."""
    step = max(1, 128 // d) * d
    return [(start, min(start + step, width)) for start in range(0, width, step)]


@torch.no_grad()
def search_codes(rows: Tensor, codebooks: list[Tensor], codes: Tensor, hessian: Tensor | None = None, *,
                 beam: int = BEAM) -> Tensor:
    """One pass of the joint code search (see the module docstring); ``codes [M, C, N]`` (long) is updated
    in place and returned. ``rows [N, C*d]`` is read; ``hessian [C*d, C*d]`` or None (the plain, or
    row-weighted, objective: slices are then independent and the row weights do not change any row's
    best codes). No row's objective rises: a row whose new codes score worse (rounding) gets its old ones."""
    stages, num_codebooks, n = codes.shape
    d = rows.shape[1] // num_codebooks
    rows = rows.float()
    if hessian is None:
        slices = rows.view(n, num_codebooks, d)
        if codebooks[0].shape[0] == 1:  # one problem over every slice
            flat = codes.permute(2, 1, 0).reshape(-1, stages)
            found = beam_codes(slices.reshape(-1, d), _words(codebooks, 0), flat, beam)
            codes.copy_(found.view(n, num_codebooks, stages).permute(2, 1, 0))
        else:
            for c in range(num_codebooks):
                codes[:, c] = beam_codes(slices[:, c], _words(codebooks, c), codes[:, c].t(), beam).t()
        return codes
    hessian = hessian.float()
    old = codes.clone()
    before = row_errors(rows - _summed(codebooks, codes), hessian, None)
    blocks = torch.stack([hessian[c * d:(c + 1) * d, c * d:(c + 1) * d] for c in range(num_codebooks)])
    # reason: an input that never carried energy leaves its block singular; a ridge this small keeps it invertible
    ridge = _RIDGE * blocks.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
    blocks = blocks + ridge * torch.eye(d, device=rows.device)
    factors = torch.linalg.cholesky(blocks)  # H_cc = L Lᵀ
    inverses = torch.cholesky_inverse(factors)
    step = max(1, 2**21 // rows.shape[1])
    for first in range(0, n, step):
        last = min(first + step, n)
        residual = rows[first:last] - _summed(codebooks, codes[:, :, first:last])
        for start, end in _column_blocks(rows.shape[1], d):
            pulls = residual @ hessian[start:end].t()  # [rows, block]: Δ H on the block's columns
            for c in range(start // d, end // d):
                block, local = slice(c * d, (c + 1) * d), slice(c * d - start, (c + 1) * d - start)
                words = _words(codebooks, c)
                current = codes[:, c, first:last].t()  # [rows, M]
                word = words[torch.arange(stages, device=rows.device), current].sum(1)
                free = residual[:, block] + word  # the slice's error were its words left out
                pull = pulls[:, local] - residual[:, block] @ blocks[c]  # what the other slices' errors add
                target = free + pull @ inverses[c]  # the slice's error is then ||(target - Σ words) L||²
                found = beam_codes(target @ factors[c], words @ factors[c], current, beam)
                codes[:, c, first:last] = found.t()
                change = word - words[torch.arange(stages, device=rows.device), found].sum(1)
                residual[:, block] += change
                pulls[:, local.stop:] += change @ hessian[block, c * d + d:end]
    worse = row_errors(rows - _summed(codebooks, codes), hessian, None) > before
    codes[:, :, worse] = old[:, :, worse]
    return codes


def _solve_direct(rows: Tensor, codebooks: list[Tensor], codes: Tensor, row_weights: Tensor | None) -> list[Tensor]:
    """The least-squares codebooks of every stage at once for ``Σ_n f_n ||w_n - ŵ_n||²``: per codebook group,
    the normal equations in the ``M K`` codewords (each of the d coordinates a right-hand side)."""
    stages, num_codebooks, n = codes.shape
    groups, k, d = codebooks[0].shape
    unknowns = stages * k
    f = torch.ones(n, dtype=torch.float64, device=rows.device) if row_weights is None else row_weights.double()
    slices = rows.double().view(n, num_codebooks, d)
    index = (codes.long() + (torch.arange(stages, device=rows.device) * k).view(-1, 1, 1))  # [M, C, N]
    solved = []
    for g in range(groups):
        chosen = slice(None) if groups == 1 else slice(g, g + 1)
        idx = index[:, chosen].reshape(stages, -1)  # [M, P]: the points' codeword numbers in each stage
        weight = f.repeat(idx.shape[1] // n) if groups == 1 else f  # point (c, n) weighs f_n
        points = slices[:, chosen].transpose(0, 1).reshape(-1, d)  # [P, d] in (c, n) order, as idx
        normal = torch.zeros(unknowns * unknowns, dtype=torch.float64, device=rows.device)
        for a in range(stages):
            for b in range(stages):
                normal.index_add_(0, idx[a] * unknowns + idx[b], weight)
        normal = normal.view(unknowns, unknowns)
        right = torch.zeros(unknowns, d, dtype=torch.float64, device=rows.device)
        for a in range(stages):
            right.index_add_(0, idx[a], points * weight.unsqueeze(1))
        old = torch.cat([cb[g].double() for cb in codebooks])  # [M K, d]
        ridge = _RIDGE * float(normal.diagonal().mean().clamp_min(1e-30))
        normal.diagonal().add_(ridge)
        solution = torch.linalg.solve(normal, right + ridge * old)
        solved.append(solution.view(stages, k, d))
    return [torch.stack([s[m] for s in solved]) for m in range(stages)]


def solve_codebooks(rows: Tensor, codebooks: list[Tensor], codes: Tensor, hessian: Tensor | None = None,
                    row_weights: Tensor | None = None, *, iters: int = _CG_ITERS) -> list[Tensor]:
    """The codebooks of every stage (a list of ``[G, K, d]``) minimising the fit's objective together for the
    fixed ``codes [M, C, N]``; see the module docstring. Returns float64 codebooks; with ``hessian``, the
    conjugate gradients start from ``codebooks`` and stop after ``iters`` iterations or once one gains
    less than 1e-9 of the objective."""
    if hessian is None:
        return _solve_direct(rows, codebooks, codes, row_weights)
    stages, num_codebooks, n = codes.shape
    groups, k, d = codebooks[0].shape
    width = rows.shape[1]
    tiled = hessian.float().repeat(stages, stages)  # the Gram matrix of M copies of each input
    if groups == 1:  # one shared codebook of M K codewords, stage m's codes offset by m K
        stacked = torch.cat([cb.float() for cb in codebooks], 1)
        virtual = (codes.long() + (torch.arange(stages, device=codes.device) * k).view(-1, 1, 1))
        virtual = virtual.reshape(stages * num_codebooks, n).to(code_dtype(stages * k))
    else:
        stacked = torch.cat([cb.float() for cb in codebooks], 0)
        virtual = codes.reshape(stages * num_codebooks, n).to(code_dtype(k))
    target = torch.zeros(n, stages * width, dtype=torch.float32, device=rows.device)
    target[:, :width] = rows.float()  # [W, 0, ...]: its product with M copies of x is W x
    solved = least_squares_codebooks(lambda s, e: target[s:e].clone(), n, stacked, virtual, tiled, iters=iters,
                                     tolerance=1e-9).double()
    if groups == 1:
        return [solved[:, m * k:(m + 1) * k] for m in range(stages)]
    return [solved[m * num_codebooks:(m + 1) * num_codebooks] for m in range(stages)]


def _product_start(rows: Tensor, stages: int, num_codebooks: int, fit) -> tuple[list[FitResult], float] | None:
    """The product quantizer of ``num_codebooks * stages`` slices of ``d / M`` values, written as M stages
    of ``d`` values (stage m's codewords zero outside the m-th part of the slice): the same weight, so the
    joint steps start no worse than one codebook at the same bits of codes. None where M does not divide d."""
    d = rows.shape[1] // num_codebooks
    if d % stages:
        return None
    part = d // stages
    sub = fit(rows, num_codebooks * stages)
    groups, k, _ = sub.codebooks.shape
    codes = sub.codes.view(num_codebooks, stages, -1)
    words = sub.codebooks.view(1 if groups == 1 else num_codebooks, 1 if groups == 1 else stages, k, part)
    results = []
    for m in range(stages):
        codebooks = sub.codebooks.new_zeros(words.shape[0], k, d)
        codebooks[..., m * part:(m + 1) * part] = words[:, 0 if groups == 1 else m]
        results.append(FitResult(codebooks, codes[:, m].contiguous(), 0.0))
    return results, sub.error


@torch.no_grad()
def fit_additive(rows: Tensor, stages: int, num_codebooks: int, num_codes: int, shared: bool, *,
                 hessian: Tensor | None = None, row_weights: Tensor | None = None, error_feedback: bool = True,
                 damp: float, seed: int = 0, rounds: int = REFINE_ROUNDS, joint_rounds: int = JOINT_ROUNDS,
                 beam: int = BEAM, product_start: bool = True) -> tuple[list[FitResult], float]:
    """Fit ``stages`` codebook-and-code pairs whose expansions sum to ``rows [N, C*d]`` (arguments as
    :func:`fit_rows`'s): the greedy fit with ``rounds`` of stage refits or, where ``product_start`` and it
    scores lower, the product quantizer of ``d / M``-value slices (:func:`_product_start`); then at most
    ``joint_rounds`` of the joint code search (``beam`` candidates) and codebook solve, each step kept only
    where it lowers the objective, stopping once a round gains less than 1e-3 of it. Returns the stages' fits
    and the objective relative to an all-zero weight's. ``hessian`` is read, never overwritten."""
    rows = rows.detach().float()
    total = _objective(rows, hessian, row_weights)

    def fit(target: Tensor, m: int, r: int, codebooks: int = num_codebooks) -> FitResult:
        # reason: each (stage, round) its own seed, so a refit is a new start rather than the same one again
        return fit_rows(target, codebooks, num_codes, shared, hessian=hessian, row_weights=row_weights,
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
    del residual, expanded
    product = _product_start(rows, stages, num_codebooks, lambda t, c: fit(t, 0, rounds + 1, c)) \
        if product_start and stages > 1 else None
    if product is not None:
        product_error = _objective(rows - _summed([r.codebooks for r in product[0]],
                                                  torch.stack([r.codes.long() % num_codes for r in product[0]])),
                                   hessian, row_weights)
        if product_error < error:
            results, error = product[0], product_error
    if joint_rounds and stages > 1:
        results, error = _joint(rows, results, error, hessian, row_weights, joint_rounds, beam)
    return results, error / total if total > 0 else 0.0


def _joint(rows: Tensor, results: list[FitResult], error: float, hessian: Tensor | None,
           row_weights: Tensor | None, rounds: int, beam: int) -> tuple[list[FitResult], float]:
    """Alternate :func:`search_codes` and :func:`solve_codebooks` from ``results`` (objective ``error``)."""
    k = results[0].codebooks.shape[1]
    codebooks = [r.codebooks.double() for r in results]
    codes = torch.stack([r.codes.long() % k for r in results])  # reason: int16 holds codes >= 32768 as negatives
    for _ in range(rounds):
        before = error
        codes = search_codes(rows, codebooks, codes.clone(), hessian, beam=beam)
        solved = solve_codebooks(rows, codebooks, codes, hessian, row_weights)
        searched = _objective(rows - _summed(codebooks, codes), hessian, row_weights)
        candidate = _objective(rows - _summed(solved, codes), hessian, row_weights)
        if candidate < searched:
            codebooks, searched = solved, candidate
        if searched >= error:  # reason: rounding can undo a step's gain; keep what was there
            break
        error = searched
        results = [FitResult(cb, codes[m].to(code_dtype(k)), 0.0) for m, cb in enumerate(codebooks)]
        if before - error <= _MIN_GAIN * before:
            break
    return results, error
