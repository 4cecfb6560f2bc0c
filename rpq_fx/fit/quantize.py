"""Fit one RPQ weight to a trained dense weight: product quantization, optionally data-aware.

Three objectives, one representation (``codebooks [G, K, d]``, ``codes [C, N]``):

- plain: the weight error ``||W - Ŵ||²``, by k-means over the rows' sub-vectors (per codebook, or
  over all slices for a shared codebook);
- row-weighted (an embedding): ``Σ_n f_n ||w_n - ŵ_n||²`` with ``f_n`` how often row ``n`` was
  looked up, by weighted k-means;
- input-aware (a linear or conv layer): the output error ``tr(Δ H Δᵀ)`` for a Gram matrix ``H`` of
  its inputs (``XᵀX``; calibration weighs each input row by its output, see ``calibrate``). Slices
  are quantised one codebook at a time, those whose inputs carry most energy first (GPTQ's
  act-order), each under the metric that the inverse of ``H`` gives it, the error of every
  quantised slice pushed onto the slices not yet quantised (GPTQ's update, for vectors as in
  GPTVQ); a codebook of its own is fitted right before its slices are, in that metric, and a
  shared one starts from k-means over all slices, each weighed by its inputs' energy (``H``'s
  diagonal). The codebooks are then solved for the chosen codes (conjugate gradients on the
  quadratic in the codebooks, to within 1e-6 of the objective); last, coordinate descent on the
  codes under the whole ``H`` (each slice's codes the best for the others as they are), each pass
  followed by a solve. The sequential passes work in blocks of columns (GPTQ's lazy batch
  updates) and in float32, so a layer costs a few products of its size by ``H``.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DAMP
from ..nn.weight import code_dtype
from ..ops import expand, expand_backward
from .kmeans import kmeans, lloyd_step, nearest

__all__ = ["FitResult", "fit_rows", "row_errors", "least_squares_codebooks"]

_MAX_POINTS_PER_CODE = 64  # k-means learns codewords on at most this many points each (faiss uses 256)
# reason: a row-weighted problem (an embedding's rows weighted by their lookups) learns its codewords on a uniform
# sample, mostly of rows the calibration never looked up; one Lloyd step over every weighted point left the codebook
# there. Five (none raises the weighted objective): MiniLM's word embedding alone, at d=8 + 6144 hot rows, 0.9654 ->
# 0.9685 mean cosine on the validation lines (benchmarks/results/minilm_heldout.md), for 2 more CPU s
_ROW_WEIGHTED_STEPS = 5
_GROUP_ELEMENTS = 2**23  # k-means runs on about this many point values at a time (32 MiB fp32)
_ERROR_ELEMENTS = 2**21  # the fit error is summed over row chunks of about this many values
_BLOCK_COLUMNS = 128  # columns per block of the sequential passes (GPTQ's block size)
_REFINE_PASSES = 2  # of coordinate descent on the codes, each followed by a codebook solve
# reason: the per-slice loop runs once per row chunk, its work (products, nearest codewords) is the same for any chunk;
# on a Linear(8192, 8192) (data-aware d=4) chunks of 4096 rows peaked at 2.38x the layer (benchmarks/results/fit_big.md):
# 2048 rows hold 0.25x of it less
_CHUNK_ELEMENTS = 2**24  # the input-aware passes hold about this many values of the rows at a time (64 MiB fp32)
_SOLVE_ROWS = 1024  # a shared codebook (K*d values) is solved for on at most this many rows, drawn at random
_SOLVE_ELEMENTS = 2**23  # the codebook solve reads the rows in chunks of about this many values (32 MiB fp32)
_FACTOR_BLOCK = 512  # columns per block of the in-place Cholesky factorisation (and of products by a packed H)


@dataclass
class FitResult:
    codebooks: Tensor  # [G, K, d]
    codes: Tensor  # [C, N], code_dtype(K): uint8, or int16 holding codes >= 32768 as bit patterns
    error: float  # the objective at the fit, relative to that of an all-zero weight


def _scalar_summary(points: Tensor, weights: Tensor | None, bins: int) -> tuple[Tensor, Tensor]:
    """Scalars ``points [B, M, 1]`` summarised as the weighted means of the cells that two
    partitions of the sorted values make together: ``bins`` runs of equal count (resolution where
    values are dense) and ``bins`` intervals of equal width (no two values far apart merged, so each
    outlier keeps its own point). ``[B, 2 bins, 1]`` points and ``[B, 2 bins]`` weights, unused
    cells weighing 0."""
    values, order = points[..., 0].sort(dim=1)
    w = torch.ones_like(values) if weights is None else weights.gather(1, order)
    batch, m = values.shape
    run = (torch.arange(m, device=values.device) * bins // m).expand(batch, m)
    low, high = values[:, :1], values[:, -1:]
    width = ((values - low) / (high - low).clamp_min(1e-30) * bins).long().clamp_max(bins - 1)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = (run[:, 1:] != run[:, :-1]) | (width[:, 1:] != width[:, :-1])
    cell = new.long().cumsum(1) - 1  # [B, M], < 2 bins: each partition starts a cell at most bins times
    totals = w.new_zeros(batch, 2 * bins).scatter_add_(1, cell, w)
    sums = w.new_zeros(batch, 2 * bins).scatter_add_(1, cell, w * values)
    return (sums / totals.clamp_min(1e-30)).unsqueeze(-1), totals


def _sample(m: int, count: int, generator: torch.Generator, device) -> Tensor:
    """``count`` distinct indices of ``range(m)`` drawn uniformly at random, without an ``m``-long permutation."""
    if m <= 8 * count:
        return torch.randperm(m, generator=generator, device=device)[:count]
    # reason: randperm(m) is an int64 tensor of m values (128 MiB for the slices of a Linear(8192, 8192) at d=4); draws
    # with replacement, kept once each, are as uniform over the subsets of that size (a few repeat at these sizes)
    while True:
        drawn = torch.randint(m, (count + count // 8 + 16,), generator=generator, device=device).unique()
        if drawn.numel() >= count:
            return drawn[torch.randperm(drawn.numel(), generator=generator, device=device)[:count]]


def _kmeans(points: Tensor, k: int, weights: Tensor | None, generator: torch.Generator,
            keep_codes: bool = True, steps: int = 1) -> tuple[Tensor, Tensor | None]:
    """k-means on ``points [B, M, d]`` (any strides: never copied whole), a group of problems at a
    time: ``(centroids [B, k, d], codes [B, M])``, codes as ``code_dtype(k)`` (None unless ``keep_codes``,
    where they would be a large array). Each is learnt on at
    most 64 points per codeword, then, where points were left out, ``steps`` Lloyd steps over every point
    (so each codeword is the mean of the points it stands for). Those points are a random sample;
    for scalars, :func:`_scalar_summary`, which keeps the outliers a sample would miss (a weight of
    7.9 among thousands within ±0.5 needs a codeword of its own)."""
    batch, m, d = points.shape
    most = _MAX_POINTS_PER_CODE * k
    dtype = code_dtype(k)
    group = max(1, _GROUP_ELEMENTS // (min(m, most) * d))
    centroids = torch.empty(batch, k, d, dtype=torch.float32, device=points.device)
    codes = torch.empty(batch, m, dtype=dtype, device=points.device) if keep_codes else None
    for b in range(0, batch, group):
        part, w = points[b:b + group], None if weights is None else weights[b:b + group]
        if m <= most:
            centroids[b:b + group], found = kmeans(part.float().contiguous(), k, weights=w, generator=generator)
            if keep_codes:
                codes[b:b + group] = found
            continue
        if d == 1:
            summary, summary_weights = _scalar_summary(part, w, most // 2)
        else:
            chosen = _sample(m, most, generator, points.device)
            summary, summary_weights = part[:, chosen], None if w is None else w[:, chosen]
        seeds, _ = kmeans(summary.float(), k, weights=summary_weights, generator=generator)
        for _ in range(steps - 1):
            seeds, _ = lloyd_step(part, seeds, w, None)
        centroids[b:b + group], found = lloyd_step(part, seeds, w, dtype if keep_codes else None)
        if keep_codes:
            codes[b:b + group] = found
    return centroids, codes


def _plain(slices: Tensor, k: int, shared: bool, weights: Tensor | None,
           generator: torch.Generator, keep_codes: bool = True, steps: int = 1) -> tuple[Tensor, Tensor | None]:
    """k-means per codebook (``[C, N, d]`` problems) or over all slices (one problem); ``weights``
    (broadcast to ``[C, N]``) weigh each slice. Codes ``[C, N]`` as ``code_dtype(k)`` (None unless ``keep_codes``)."""
    n, c, d = slices.shape
    weights = None if weights is None else weights.expand(c, n)
    if shared:
        centroids, codes = _kmeans(slices.reshape(1, n * c, d), k, None if weights is None
                                   else weights.t().reshape(1, -1), generator, keep_codes, steps)
        return centroids, None if codes is None else codes.view(n, c).t().contiguous()
    return _kmeans(slices.transpose(0, 1), k, weights, generator, steps=steps)


def row_errors(delta: Tensor, hessian: Tensor | None, row_weights: Tensor | None) -> Tensor:
    """Each row's share of the fit's objective: ``Δ_n H Δ_nᵀ``, ``f_n ||Δ_n||²`` or ``||Δ_n||²``, summed in float64."""
    if hessian is not None:
        delta = delta.to(hessian.dtype)
        return ((delta @ hessian) * delta).sum(1, dtype=torch.float64)
    errors = delta.square().sum(1, dtype=torch.float64)
    return errors if row_weights is None else errors * row_weights.double()


def _chunks(rows: int, width: int, elements: int = 2**23) -> list[tuple[int, int]]:
    """``(start, end)`` of the row chunks holding about ``elements`` values of rows ``width`` long."""
    step = max(1, elements // max(1, width))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _relative_error(take, rows: int, codebooks: Tensor, codes: Tensor, hessian: Tensor | None,
                    row_weights: Tensor | None) -> float:
    """The fit's objective relative to that of an all-zero weight, over chunks of rows (``take(start, end)``)."""
    codebooks = codebooks.float()
    left = total = 0.0
    for start, end in _chunks(rows, codebooks.shape[-1] * codes.shape[0], _ERROR_ELEMENTS):
        part = take(start, end).float()
        weights = None if row_weights is None else row_weights[start:end]
        delta = part - expand(codebooks, codes[:, start:end].contiguous())
        left += float(row_errors(delta, hessian, weights).sum())
        total += float(row_errors(part, hessian, weights).sum())
    return left / total if total > 0 else 0.0


def _damping(diagonal: Tensor, damp: float) -> Tensor:
    """What GPTQ adds to ``H``'s diagonal: inputs that never carried energy get 1 on it, then
    ``damp`` of its mean is added to every entry (keeping ``H`` invertible)."""
    fixed = torch.where(diagonal > 0, diagonal, torch.ones_like(diagonal))
    return fixed + damp * fixed.mean() - diagonal


def _permute_(h: Tensor, order: Tensor) -> None:
    """``h[order][:, order]`` in place: the rows by following the permutation's cycles (one row held
    aside), the columns a chunk of rows at a time; nothing of ``h``'s size is allocated."""
    target = order.tolist()
    done = [False] * len(target)
    for start in range(len(target)):
        if done[start] or target[start] == start:
            continue
        held, i = h[start].clone(), start
        while True:  # row i of the result is row target[i] of h
            done[i] = True
            if target[i] == start:
                h[i] = held
                break
            h[i] = h[target[i]]
            i = target[i]
    for start, end in _chunks(*h.shape, _CHUNK_ELEMENTS):
        h[start:end] = h[start:end].index_select(1, order)


def _blocks_of(width: int, d: int, block: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the diagonal blocks of :class:`_Packed`: about ``block`` wide, whole slices."""
    step = max(1, block // d) * d
    return [(start, min(start + step, width)) for start in range(0, width, step)]


class _Packed:
    """``H`` and the Cholesky factor ``L`` of ``H + diag(add)`` in ``H``'s own memory: ``L`` (lower triangular)
    overwrites ``H``'s lower triangle and the diagonal blocks, ``H`` keeps its strictly upper off-diagonal blocks,
    and its diagonal blocks (``[width, block]`` values in all) are kept aside. The factor is a blocked left-looking
    Cholesky that writes only ``L``'s part of the buffer; :meth:`matmul` multiplies by ``H`` from its upper blocks
    and :meth:`unpack` rebuilds ``H`` in the buffer once ``L`` is no longer needed. ``factor`` (the buffer) can be
    read wherever ``L`` is nonzero and in the diagonal blocks (zeros above ``L``'s diagonal there)."""

    def __init__(self, hessian: Tensor, add: Tensor, d: int, block: int = _FACTOR_BLOCK):
        self.factor = hessian
        self.spans = _blocks_of(hessian.shape[0], d, block)
        self.diagonal = []  # H's diagonal blocks
        for start, end in self.spans:
            self.diagonal.append(hessian[start:end, start:end].clone())
            panel = hessian[start:, start:end]  # H's lower part in these columns (its upper part: the block's)
            if start:  # reason: the strictly lower part left of this block already holds L
                panel.sub_(hessian[start:, :start] @ hessian[start:end, :start].t())
            corner = panel[:end - start] + torch.diag(add[start:end])
            factor = torch.linalg.cholesky(corner)
            hessian[start:end, start:end] = factor
            if end < hessian.shape[0]:  # L[end:, block] L_bbᵀ = what is left of H there
                panel[end - start:] = torch.linalg.solve_triangular(factor.t(), panel[end - start:], upper=True,
                                                                    left=False)

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ H`` (``H`` symmetric: its lower blocks are the transposes of its upper ones)."""
        h, out = self.factor, x.new_empty(x.shape[0], self.factor.shape[0])
        for (start, end), block in zip(self.spans, self.diagonal):
            part = x[:, start:end] @ block
            if start:
                part.addmm_(x[:, :start], h[:start, start:end])
            if end < h.shape[0]:
                part.addmm_(x[:, end:], h[start:end, end:].t())
            out[:, start:end] = part
        return out

    def diagonal_blocks(self, d: int) -> Tensor:
        """``H``'s ``[width / d, d, d]`` diagonal blocks."""
        return torch.cat([block.view(-1, d, block.shape[0] // d, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
                          for block in self.diagonal])

    def unpack(self) -> Tensor:
        """``H`` again, in the buffer (``L`` is lost); outside the diagonal blocks its lower triangle is now its
        upper one's mirror (a Gram matrix summed in floating point is symmetric only up to rounding)."""
        h = self.factor
        for (start, end), block in zip(self.spans, self.diagonal):
            h[start:end, start:end] = block
            h[end:, start:end] = h[start:end, end:].t()
        self.diagonal = []
        return h


def _times(x: Tensor, hessian) -> Tensor:
    """``x @ H`` for ``H`` a tensor or :class:`_Packed`."""
    return hessian.matmul(x) if isinstance(hessian, _Packed) else x @ hessian


def _diagonal_blocks(hessian, d: int) -> Tensor:
    """``H``'s ``[width / d, d, d]`` diagonal blocks, for ``H`` a tensor or :class:`_Packed`."""
    if isinstance(hessian, _Packed):
        return hessian.diagonal_blocks(d)
    n = hessian.shape[0] // d
    return hessian.view(n, d, n, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _column_blocks(width: int, d: int):
    """``(start, end)`` of the column blocks (whole slices, about ``_BLOCK_COLUMNS`` wide) in which the
    sequential passes keep their updates local, applying them to the columns after a block at its end
    in one matrix product (GPTQ's lazy batch updates: the same arithmetic, not one pass over the
    weight per slice)."""
    step = max(1, _BLOCK_COLUMNS // d) * d
    return [(start, min(start + step, width)) for start in range(0, width, step)]


def _sequential(take, rows: int, factor: Tensor, codebooks: Tensor | None, num_codebooks: int, k: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Quantise the slices codebook by codebook, last first, each to the codeword nearest its target under
    the metric ``L_cc`` (``H + damping = L Lᵀ``), the errors of those already quantised pushed onto it:
    ``||Δ L||²``'s column block ``c`` is ``Δ_c L_cc + Σ_{a>c} Δ_a L_ac``, so the slice's best code given
    the later ones is the nearest to ``w_c + (Σ_{a>c} Δ_a L_ac) L_cc⁻¹`` (Babai's nearest plane, which is
    GPTQ's error feedback without inverting ``H``). A 1-d ``factor`` (no feedback): each slice alone;
    else only ``L``'s nonzero part and diagonal blocks are read (:class:`_Packed` keeps ``H`` in the rest).
    ``codebooks=None`` fits each codebook (one per slice position) right before its slices, over all rows
    at once; a given codebook lets the rows go a chunk at a time (``take(start, end)``: the rows, as a
    tensor the pass may overwrite)."""
    diagonal = factor.dim() == 1
    width = factor.shape[0]
    d = width // num_codebooks
    eye = torch.eye(d, dtype=factor.dtype, device=factor.device)
    blocks = torch.diag_embed(factor.view(num_codebooks, d)) if diagonal else \
        factor.view(num_codebooks, d, num_codebooks, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # L_cc
    inverses = torch.linalg.solve_triangular(blocks, eye.expand_as(blocks), upper=False)
    fitted = codebooks is None
    codebooks = factor.new_empty(num_codebooks, k, d) if fitted else codebooks.to(factor.dtype, copy=True)
    codes = torch.empty(num_codebooks, rows, dtype=torch.uint8 if k <= 256 else torch.long, device=factor.device)
    for first, last in [(0, rows)] if fitted else _chunks(rows, width, _CHUNK_ELEMENTS):
        # reason: a slice's rows are not read again once its error is known, so the errors overwrite them (the
        # rows and their errors held at once were a layer's size on a big one)
        w = delta = take(first, last)
        for start, end in reversed(_column_blocks(width, d)):
            pull = w.new_zeros(last - first, end - start) if diagonal or end == width else \
                delta[:, end:] @ factor[end:, start:end]
            for c in range(end // d - 1, start // d - 1, -1):
                columns, local = slice(c * d, (c + 1) * d), c * d - start
                target = w[:, columns] + pull[:, local:local + d] @ inverses[c]
                points = (target @ blocks[c]).unsqueeze(0)
                group = c if codebooks.shape[0] > 1 else 0
                if fitted:
                    centroids, _ = _kmeans(points, k, None, generator)
                    codebooks[c] = centroids[0] @ inverses[c]
                chosen = nearest(points, (codebooks[group] @ blocks[c]).unsqueeze(0))[0][0]
                codes[c, first:last] = chosen
                delta[:, columns] -= codebooks[group][chosen]
                if local and not diagonal:
                    pull[:, :local] += delta[:, columns] @ factor[columns, start:c * d]
    return codebooks, codes


def least_squares_codebooks(take, rows: int, codebooks: Tensor, codes: Tensor, hessian, iters: int = 8,
                            tolerance: float = 1e-6) -> Tensor:
    """The codebooks minimising ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` for fixed codes, ``W``'s rows read a chunk at a
    time (``take(start, end)``): conjugate gradients on the normal equations ``Aᵀ H A x = Aᵀ H w`` (A:
    expansion, Aᵀ: its scatter), one product by ``H`` per iteration, preconditioned per codeword by
    ``Σ_c count_c(k) H_cc`` (the blocks of ``Aᵀ H A`` that each codeword's own slices make); it stops
    once a step lowers the objective by less than ``tolerance`` of it. ``hessian``: a tensor or :class:`_Packed`."""
    groups, k, d = codebooks.shape
    num_codebooks = codes.shape[0]
    blocks = _diagonal_blocks(hessian, d)  # [C, d, d]
    dtype = blocks.dtype
    codebooks = codebooks.to(dtype)
    chunks = _chunks(rows, num_codebooks * d, _SOLVE_ELEMENTS)
    parts = [codes[:, start:end].to(code_dtype(k)).contiguous() for start, end in chunks]

    def normal(v: Tensor) -> Tensor:
        return sum(expand_backward(_times(expand(v, part), hessian), part, groups, k) for part in parts)

    offsets = torch.arange(num_codebooks, device=codes.device).unsqueeze(1) * k
    counts = torch.bincount((codes.long() % k + offsets).view(-1), minlength=num_codebooks * k)
    counts = counts.view(num_codebooks, k).to(dtype)
    used = counts.sum(0, keepdim=True).gt(0) if groups == 1 else counts.gt(0)  # [G, K]
    if groups == 1:
        precondition = torch.einsum("ck,cij->kij", counts, blocks).unsqueeze(0)
        eye = torch.eye(d, dtype=dtype, device=blocks.device)
        factor, info = torch.linalg.cholesky_ex(precondition + (~used).view(groups, k, 1, 1) * eye)

        def apply(v: Tensor) -> Tensor:
            return torch.cholesky_solve(v.unsqueeze(-1), factor).squeeze(-1)
    else:
        # reason: each codeword's block is count * H_cc, its codebook's block scaled: one factor per codebook, not a
        # [C, K, d, d] stack (512 MiB, and as much again for its factor, at d=64 on a Linear(8192, 8192))
        factor, info = torch.linalg.cholesky_ex(blocks)

        def apply(v: Tensor) -> Tensor:
            return torch.cholesky_solve(v.transpose(1, 2), factor).transpose(1, 2) / counts.clamp_min(1).unsqueeze(-1)
    solve = (lambda v: apply(v) * used.unsqueeze(-1)) \
        if not info.any() else (lambda v: v * used.unsqueeze(-1))  # reason: a singular block: no preconditioning
    x = codebooks.clone()
    objective, r = 0.0, torch.zeros_like(x)
    for (start, end), part in zip(chunks, parts):
        residual = take(start, end).to(dtype).sub_(expand(x, part))
        gradient = _times(residual, hessian)
        objective += float((gradient * residual).sum())
        r += expand_backward(gradient, part, groups, k)
    r *= used.unsqueeze(-1)
    z = solve(r)
    p = z.clone()
    rz = (r * z).sum()
    for _ in range(iters):
        if rz <= 0:
            break
        ap = normal(p)
        alpha = rz / (p * ap).sum()
        x += alpha * p
        decrease = float(alpha * rz)
        objective -= decrease
        if decrease <= tolerance * objective:
            break
        r -= alpha * ap
        z = solve(r)
        rz, previous = (r * z).sum(), rz
        p = z + (rz / previous) * p
    return x


def _refine_codes(rows: Tensor, hessian: Tensor, codebooks: Tensor, codes: Tensor) -> Tensor:
    """One pass of coordinate descent on ``tr(Δ H Δᵀ)``: slice by slice, every row's code becomes the
    best one with all its other slices as they are (the error they leave included, which GPTQ's
    one pass only sees ahead of it), so the objective never rises. ``Δ H`` is computed for a block
    of columns at a time and kept current inside it (:func:`_column_blocks`). ``codes`` is updated in place
    and returned; ``rows`` is overwritten (with the errors the codes leave)."""
    num_codebooks = codes.shape[0]
    d = rows.shape[1] // num_codebooks
    residual = rows  # reason: in place; the rows and their errors held at once were a layer's size on a big one
    small = codes.to(code_dtype(codebooks.shape[1]))
    for start, end in _chunks(rows.shape[0], rows.shape[1], _ERROR_ELEMENTS):
        residual[start:end] -= expand(codebooks, small[:, start:end].contiguous())
    blocks = torch.stack([hessian[c * d:(c + 1) * d, c * d:(c + 1) * d] for c in range(num_codebooks)])
    factors = torch.linalg.cholesky(blocks)  # H_bb = L Lᵀ
    inverses = torch.cholesky_inverse(factors)
    for start, end in _column_blocks(rows.shape[1], d):
        # H symmetric: its rows, contiguous, stand for its columns
        pulls = residual @ hessian[start:end].t()  # [N, block]: Δ H on the block's columns
        for c in range(start // d, end // d):
            block, local = slice(c * d, (c + 1) * d), slice(c * d - start, (c + 1) * d - start)
            words = codebooks[c if codebooks.shape[0] > 1 else 0]
            free = residual[:, block] + words[codes[c].long()]  # the slice's error were it left out
            pull = pulls[:, local] - residual[:, block] @ blocks[c]  # what the other slices' errors add
            target = free + pull @ inverses[c]  # the slice's error is then ||(target - word) L||²
            points, centroids = (target @ factors[c]).unsqueeze(0), (words @ factors[c]).unsqueeze(0)
            codes[c] = nearest(points.float(), centroids.float())[0][0]
            change = free - words[codes[c].long()] - residual[:, block]
            residual[:, block] += change
            pulls[:, local.stop:] += change @ hessian[block, c * d + d:end]
    return codes


def _solve(rows: Tensor, columns: Tensor, codebooks: Tensor, codes: Tensor, hessian,
           generator: torch.Generator) -> Tensor:
    """:func:`least_squares_codebooks` for ``rows`` in the fit's column order; a shared codebook (``K*d``
    values) on ``_SOLVE_ROWS`` of them, drawn at random, where there are more."""
    if codebooks.shape[0] > 1 or rows.shape[0] <= _SOLVE_ROWS:
        return least_squares_codebooks(lambda s, e: rows[s:e].index_select(1, columns).float(), rows.shape[0],
                                       codebooks, codes, hessian)
    # reason: each of a few hundred codewords sees hundreds of thousands of slices in that many rows; a product
    # by H over all rows per iteration is the fit's largest cost on a big layer
    chosen = torch.randperm(rows.shape[0], generator=generator, device=rows.device)[:_SOLVE_ROWS].sort().values
    some = rows.index_select(0, chosen).index_select(1, columns).float()
    # reason: 4 iterations, not 8: on fit_big's data at 2048 x 2048 the fit error is the same to 4 digits (0.001937)
    return least_squares_codebooks(lambda s, e: some[s:e], len(chosen), codebooks, codes[:, chosen], hessian, iters=4)


def _in_energy_order(rows: Tensor, hessian: Tensor, energy: Tensor, codebooks: Tensor | None, num_codebooks: int,
                     k: int, error_feedback: bool, damp: float, generator: torch.Generator,
                     overwrite: bool) -> tuple[Tensor, Tensor, float]:
    """The input-aware fit, its slices quantised in order of their inputs' ``energy [C]``, highest
    first (GPTQ's act-order, for slices): the errors of the slices that weigh most are pushed onto
    the quieter ones, not the other way round. Codebooks and codes come back in the rows' order,
    with the relative error (summed in that order too, so it does not depend on where slices sit).
    ``hessian`` (float32) is permuted in place where ``overwrite``, else copied once; that copy then holds
    the Cholesky factor too (:class:`_Packed`), so the fit's own memory is one ``H`` and a chunk of rows."""
    # the sequential pass goes from the last slice to the first: the loudest slices go last
    order = energy.argsort(descending=True, stable=True).flip(0)
    n, width = rows.shape
    d = width // num_codebooks
    columns = (order.view(-1, 1) * d + torch.arange(d, device=rows.device)).view(-1)
    if overwrite:
        h = hessian
        _permute_(h, columns)
    else:
        h = hessian.index_select(0, columns)
        for start, end in _chunks(width, width, _CHUNK_ELEMENTS):
            h[start:end] = h[start:end].index_select(1, columns)
    add = _damping(h.diagonal(), damp)
    take = (lambda s, e: rows[s:e].index_select(1, columns).float())
    # without error feedback each slice goes alone, weighted by its inputs' energy (H + damping's diagonal)
    packed = _Packed(h, add, d) if error_feedback else None
    factor, gram = (h, packed) if error_feedback else ((h.diagonal() + add).sqrt(), h)
    shared = codebooks is not None
    for _ in range(2 if shared else 1):
        codebooks, codes = _sequential(take, n, factor, codebooks, num_codebooks, k, generator)
        codebooks = _solve(rows, columns, codebooks, codes, gram, generator)
    del factor, gram
    # reason: error_feedback=False fits each slice alone, under H's diagonal; the whole H would undo that
    if error_feedback:
        packed.unpack()
        diagonal = h.diagonal().clone()
        for _ in range(_REFINE_PASSES):
            h.diagonal().add_(add)  # the damped H, as the sequential pass's
            for start, end in _chunks(n, width, _CHUNK_ELEMENTS):
                _refine_codes(take(start, end), h, codebooks, codes[:, start:end])
            h.diagonal().copy_(diagonal)
            codebooks = _solve(rows, columns, codebooks, codes, h, generator)
    codes = codes.to(code_dtype(k))
    error = _relative_error(take, n, codebooks, codes, h, None)
    back = order.argsort()
    return (codebooks if shared else codebooks[back]), codes[back], error


def fit_rows(rows: Tensor, num_codebooks: int, num_codes: int, shared: bool, *, hessian: Tensor | None = None,
             row_weights: Tensor | None = None, error_feedback: bool = True, damp: float = DAMP,
             seed: int = 0, overwrite_hessian: bool = False) -> FitResult:
    """Fit codebooks and codes to ``rows [N, C*d]``; ``hessian [C*d, C*d]`` (``XᵀX`` of the layer's
    inputs) or ``row_weights [N]`` make the fit data-aware (see the module docstring).
    ``error_feedback=False`` quantises each slice under ``H``'s diagonal alone, pushing nothing on.
    ``damp`` (GPTQ's default 0.01) of ``H``'s mean diagonal is added to the diagonal of the ``H``
    that steers the slice-by-slice quantisation (the codebooks are then solved under ``H`` itself). Where
    ``H`` comes from few inputs for its width (text: 256 lines for MiniLM's 384- and 1536-wide layers), a
    larger ``damp`` (0.1) fits held-out inputs better (``benchmarks/results/minilm_heldout.md``,
    ``tests/fit/test_fit_heldout.py``).

    Input-aware fits of a shared codebook run two rounds (the second re-quantises with the solved
    codebook); with a codebook per slice position one round, as a second did not help on the
    benchmark's layers. Both then take two passes of coordinate descent on the codes (with error
    feedback), each followed by a codebook solve. Extra memory: ``H`` in float32 (it holds its Cholesky
    factor too), none where ``overwrite_hessian`` lets the fit use a float32 ``hessian``'s memory (its
    contents are then lost), plus a chunk of rows (all rows with a codebook per slice position)."""
    generator = torch.Generator(rows.device).manual_seed(seed)
    rows = rows.detach()
    n, width = rows.shape
    d = width // num_codebooks
    slices = rows.float().reshape(n, num_codebooks, d)
    if hessian is not None:
        # a shared codebook starts from k-means over all slices, each weighed by its inputs' energy (codewords go
        # where inputs carry it); codebooks of their own are fitted in the H⁻¹ metric, right before their slices
        energy = hessian.diagonal().double().clamp_min(0).view(num_codebooks, d).sum(1)
        start = _plain(slices, num_codes, True, energy.float().view(-1, 1), generator, keep_codes=False)[0] \
            if shared else None
        # reason: float32 products, as GPTQ's: float64 ones are 2.5x slower on this CPU (8192² by 8192²: 13 s vs 34 s)
        copied = hessian.dtype != torch.float32  # reason: then .float() made this fit its own copy to permute
        codebooks, codes, error = _in_energy_order(rows, hessian.detach().float(), energy, start, num_codebooks,
                                                   num_codes, error_feedback, damp, generator,
                                                   overwrite=overwrite_hessian or copied)
        return FitResult(codebooks.double(), codes, error)
    weights = None if row_weights is None else row_weights.float().view(1, n)
    codebooks, codes = _plain(slices, num_codes, shared, weights, generator,
                              steps=1 if weights is None else _ROW_WEIGHTED_STEPS)
    return FitResult(codebooks.double(), codes,
                     _relative_error(lambda s, e: rows[s:e], n, codebooks, codes, None, row_weights))
