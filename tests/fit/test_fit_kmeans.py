"""Batched weighted k-means against brute force and against clusters it must find."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rpq_fx.fit import kmeans, nearest


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), points=st.integers(1, 70), k=st.integers(1, 20), dim=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_nearest_is_brute_force_argmin(batch, points, k, dim, seed):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(batch, points, dim, generator=g), torch.randn(batch, k, dim, generator=g)
    index, dist = nearest(x, c)
    brute = (x.unsqueeze(2) - c.unsqueeze(1)).square().sum(-1)  # [B, M, K]
    assert torch.allclose(dist, brute.min(-1).values, atol=1e-4)
    chosen = brute.gather(2, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, brute.min(-1).values, atol=1e-4)  # ties may pick either


@pytest.mark.parametrize("points", [1025, 5000])  # above the kernel's range: the scalar binary search
def test_nearest_of_many_scalars_is_brute_force_argmin(points):
    g = torch.Generator().manual_seed(points)
    x, c = torch.randn(2, points, 1, generator=g), torch.randn(2, 37, 1, generator=g)
    index, dist = nearest(x, c)
    brute = (x - c.transpose(1, 2)).square()  # [B, M, K]
    assert torch.allclose(dist, brute.min(-1).values)
    assert torch.allclose(brute.gather(2, index.unsqueeze(-1)).squeeze(-1), brute.min(-1).values)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), k=st.integers(2, 12), dim=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_finds_well_separated_clusters(batch, k, dim, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, k, dim, generator=g) * 100
    assume(torch.cdist(centers, centers).add(torch.eye(k) * 1e9).min() > 1)  # 100x the spread of a cluster
    labels = torch.arange(k).repeat(20)
    x = centers[:, labels] + 0.01 * torch.randn(batch, labels.numel(), dim, generator=g)
    centroids, assignment = kmeans(x, k, generator=torch.Generator().manual_seed(seed))
    for b in range(batch):
        # every true cluster is one found cluster: same labels up to a permutation
        pairs = set(zip(labels.tolist(), assignment[b].tolist()))
        assert len(pairs) == k and len({found for _, found in pairs}) == k
        error = (x[b] - centroids[b, assignment[b]]).square().sum(-1)
        assert error.max() < 1e-2


def test_is_deterministic_for_a_seed_and_weights_pull_the_mean():
    x = torch.randn(2, 500, 3, generator=torch.Generator().manual_seed(0))
    a = kmeans(x, 16, generator=torch.Generator().manual_seed(1))
    b = kmeans(x, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    weights = torch.rand(2, 500, generator=torch.Generator().manual_seed(2))
    centroid, _ = kmeans(x, 1, weights=weights)
    expected = (x * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
    assert torch.allclose(centroid[:, 0], expected, atol=1e-5)


def test_more_codewords_than_distinct_points_leaves_no_error_and_no_nan():
    base = torch.randn(1, 10, 4, generator=torch.Generator().manual_seed(3))
    x = base[:, torch.arange(300) % 10]  # 300 points on 10 places, 16 codewords: clusters run empty
    centroids, assignment = kmeans(x, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(centroids).all()
    assert torch.allclose(centroids[0, assignment[0]], x[0], atol=1e-5)
    few = torch.randn(2, 5, 3)  # fewer points than codewords: each point is a codeword
    centroids, assignment = kmeans(few, 8)
    assert centroids.shape == (2, 8, 3) and torch.equal(centroids.gather(1, assignment.unsqueeze(-1).expand(-1, -1, 3)), few)


def test_cpp_assignment_matches_the_torch_one(monkeypatch):
    from rpq_fx import _kernels

    if _kernels.kernels() is None:
        pytest.skip("the C++ kernels are not built here")
    g = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.float64):
        x, c = torch.randn(3, 700, 5, generator=g, dtype=dtype), torch.randn(3, 40, 5, generator=g, dtype=dtype)
        fast = nearest(x, c)
        monkeypatch.setenv("RPQ_FX_KERNELS", "torch")
        slow = nearest(x, c)
        monkeypatch.delenv("RPQ_FX_KERNELS")
        assert torch.equal(fast[0], slow[0]) and torch.allclose(fast[1], slow[1], atol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_chunked_lloyd_step_is_one_lloyd_step(monkeypatch, weighted):
    import sys

    from rpq_fx.fit.kmeans import lloyd_step

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3000, 3, generator=g)
    weights = torch.rand(2, 3000, generator=g) if weighted else None
    centroids = torch.randn(2, 40, 3, generator=g)
    centroids[1, 7] = 1e3  # a centroid no point is nearest to keeps its place
    monkeypatch.setattr(sys.modules["rpq_fx.fit.kmeans"], "_STEP_ELEMENTS", 2 * 3 * 250)  # 12 chunks
    means, codes = lloyd_step(x.transpose(0, 1).contiguous().transpose(0, 1), centroids, weights, torch.uint8)
    expected_codes, _ = nearest(x, centroids)
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), expected_codes)
    w = torch.ones(2, 3000) if weights is None else weights
    for b in range(2):
        for k in range(40):
            chosen = expected_codes[b] == k
            if chosen.any():
                expected = (x[b, chosen] * w[b, chosen, None]).sum(0) / w[b, chosen].sum()
                assert torch.allclose(means[b, k], expected, atol=1e-5)
            else:
                assert torch.equal(means[b, k], centroids[b, k])
