"""Batched, weighted k-means: many independent problems (one per codebook) solved at once."""

import torch
from torch import Tensor

from .. import _kernels

__all__ = ["kmeans", "lloyd_step", "nearest"]

_CHUNK_ELEMENTS = 2**25  # distance matrices are built in chunks of at most this many values (128 MiB fp32)
_STEP_ELEMENTS = 2**22  # lloyd_step reads its points in chunks of at most this many values
_KERNEL_MAX_DIM = 16  # longer codewords: a matmul per chunk beats the kernel's per-point loop
_SCALAR_SEARCH_POINTS = 1024  # more scalars than this: a binary search beats the kernel's scan (2x at 1536)


def nearest(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """For ``x [B, M, d]`` and ``centroids [B, K, d]``: the index ``[B, M]`` of each point's nearest
    centroid and its squared distance ``[B, M]``: for many scalars by binary search among the sorted
    centroids; on the CPU by the C++ kernel for short codewords (no distance matrix built), else in
    chunks of points."""
    fast = _kernels.kernels() if x.device.type == "cpu" and x.shape[2] <= _KERNEL_MAX_DIM else None
    if x.shape[2] == 1 and (fast is None or x.shape[1] > _SCALAR_SEARCH_POINTS):
        return _nearest_scalar(x[..., 0], centroids[..., 0])
    if fast is not None and x.dtype == centroids.dtype and x.dtype in (torch.float32, torch.float64):
        return fast.nearest(x, centroids)
    batch, points, _ = x.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, batch * centroids.shape[1]))
    c_norm = centroids.square().sum(-1).unsqueeze(1)  # [B, 1, K]
    index, dist = [], []
    for chunk in x.split(step, dim=1):
        d2 = torch.baddbmm(c_norm, chunk, centroids.transpose(1, 2), alpha=-2)  # |c|^2 - 2 x.c
        best, where = d2.min(-1)
        index.append(where)
        dist.append((best + chunk.square().sum(-1)).clamp_min(0))
    return torch.cat(index, 1), torch.cat(dist, 1)


def _nearest_scalar(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`nearest` for scalars ``x [B, M]``, ``centroids [B, K]``: each point's cell found among
    the midpoints of the sorted centroids, ``O(M log K)``."""
    values, order = centroids.sort(dim=1)
    cell = torch.searchsorted((values[:, 1:] + values[:, :-1]) / 2, x.contiguous())  # [B, M] in [0, K-1]
    where = order.gather(1, cell)
    return where, (x - values.gather(1, cell)).square()


def _draw(score: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of ``score [B, M]``, drawn with probability proportional to it."""
    # reason: torch.multinomial is ~20x slower than an inverse-CDF draw on rows this long
    cdf = score.double().cumsum(1)
    u = torch.rand(score.shape[0], 1, generator=generator, device=score.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(score.shape[1] - 1)


def _seed(x: Tensor, weights: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ seeding: each next centroid drawn with probability ~ weight * distance^2 to the chosen ones."""
    batch, points, dim = x.shape
    rows = torch.arange(batch, device=x.device)
    first = _draw(weights, generator)
    centroids = x.new_empty(batch, k, dim)
    centroids[:, 0] = x[rows, first]
    # reason: |x|^2 - 2 x.c + |c|^2 reads x once per centroid, where (x - c)^2 writes two copies of it
    norms = x.square().sum(-1)
    closest = (x - centroids[:, :1]).square().sum(-1)
    for j in range(1, k):
        score = weights * closest
        # reason: a problem whose points all sit on chosen centroids has no mass left; draw uniformly
        score = torch.where(score.sum(1, keepdim=True) > 0, score, weights)
        pick = _draw(score, generator)
        centroids[:, j] = x[rows, pick]
        c = centroids[:, j:j + 1]  # [B, 1, d]
        distance = torch.baddbmm(norms.unsqueeze(-1) + c.square().sum(-1, keepdim=True), x, c.transpose(1, 2),
                                 alpha=-2)
        closest = torch.minimum(closest, distance.squeeze(-1).clamp_min_(0))
    return centroids


def _refill_empty(centroids: Tensor, x: Tensor, counts: Tensor, error: Tensor) -> None:
    """Move every empty centroid onto one of the points worst served by its centroid (largest error)."""
    empty = counts == 0  # [B, K]
    most = int(empty.sum(1).max())
    if most == 0:
        return
    worst = error.topk(min(most, error.shape[1]), dim=1).indices  # [B, most]
    rank = (empty.cumsum(1) - 1).clamp(max=worst.shape[1] - 1)  # j-th empty slot takes the j-th worst point
    batch_index, slot = empty.nonzero(as_tuple=True)
    centroids[batch_index, slot] = x[batch_index, worst[batch_index, rank[batch_index, slot]]]


def kmeans(x: Tensor, k: int, *, weights: Tensor | None = None, iters: int = 20,
           generator: torch.Generator | None = None, init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``B`` independent weighted k-means problems on ``x [B, M, d]``: ``(centroids [B, k, d], assignment [B, M])``.

    k-means++ seeding (or the centroids ``init``), then Lloyd iterations until no assignment
    changes (or ``iters``); each returned centroid is the weighted mean of the points assigned to
    it. A centroid left empty is moved onto the point with the largest error. ``weights [B, M]``
    (non-negative) weight each point in seeding and in the means. Deterministic for a given
    ``generator``.
    """
    batch, points, dim = x.shape
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if weights is not None:
        weights = weights.to(x.dtype)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    if points <= k and init is None:  # reason: fewer points than codewords: each point is a codeword, the rest repeat
        centroids = x[:, torch.arange(k, device=x.device) % points]
        return centroids, torch.arange(points, device=x.device).expand(batch, points).clone()
    if init is None:
        seeding = torch.ones(batch, points, dtype=x.dtype, device=x.device) if weights is None else weights
        centroids = _seed(x, seeding, k, generator)
    else:
        centroids = init.to(x.dtype).clone()
    offsets = (torch.arange(batch, device=x.device) * k).unsqueeze(1)
    weighted = x if weights is None else x * weights.unsqueeze(-1)
    previous = None
    for _ in range(iters):
        assignment, dist = nearest(x, centroids)
        if previous is not None and torch.equal(assignment, previous):
            break  # the centroids are already the means of this assignment
        flat = (assignment + offsets).reshape(-1)
        sums = x.new_zeros(batch * k, dim).index_add_(0, flat, weighted.reshape(-1, dim))
        counts = torch.bincount(flat, minlength=batch * k).to(x.dtype) if weights is None \
            else x.new_zeros(batch * k).index_add_(0, flat, weights.reshape(-1))
        means = sums / counts.clamp_min(1e-30).unsqueeze(1)
        centroids = torch.where((counts > 0).unsqueeze(1), means, centroids.reshape(batch * k, dim)).view(batch, k, dim)
        _refill_empty(centroids, x, counts.view(batch, k), dist if weights is None else weights * dist)
        previous = assignment
    return centroids, previous


def lloyd_step(x: Tensor, centroids: Tensor, weights: Tensor | None = None,
               codes_dtype: torch.dtype | None = torch.long) -> tuple[Tensor, Tensor | None]:
    """One Lloyd step over ``x [B, M, d]`` (any strides) in chunks of points, nothing of ``x``'s size
    built but the codes: each point's nearest centroid among ``centroids [B, K, d]`` (``[B, M]``
    in ``codes_dtype``; int16 keeps indices >= 32768 as bit patterns; None: not kept) and the
    (``weights [B, M]`` weighted) mean of the points each centroid got, as ``[B, K, d]`` (unchanged
    where it got none)."""
    batch, points, dim = x.shape
    k = centroids.shape[1]
    codes = None if codes_dtype is None else torch.empty(batch, points, dtype=codes_dtype, device=x.device)
    sums = torch.zeros(batch * k, dim, dtype=torch.float64, device=x.device)
    counts = torch.zeros(batch * k, dtype=torch.float64, device=x.device)
    offsets = (torch.arange(batch, device=x.device) * k).unsqueeze(1)
    step = max(1, _STEP_ELEMENTS // (batch * dim))
    for start in range(0, points, step):
        chunk = x[:, start:start + step].to(centroids.dtype)
        where, _ = nearest(chunk.contiguous(), centroids)
        if codes is not None:
            codes[:, start:start + step] = where
        flat = (where + offsets).reshape(-1)
        w = None if weights is None else weights[:, start:start + step].double()
        values = chunk.double() if w is None else chunk.double() * w.unsqueeze(-1)
        sums.index_add_(0, flat, values.reshape(-1, dim))
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64) if w is None else w.reshape(-1))
    means = (sums / counts.clamp_min(1e-300).unsqueeze(1)).to(centroids.dtype)
    kept = torch.where((counts > 0).unsqueeze(1), means, centroids.reshape(batch * k, dim))
    return kept.view(batch, k, dim), codes
