"""The joint fit of additive codebooks: beam-searched codes and least-squares codebooks against brute force,
``torch.linalg.lstsq`` and the greedy fit."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpq_fx.fit.additive import _product_start, beam_codes, fit_additive, search_codes, solve_codebooks
from rpq_fx.fit.quantize import fit_rows
from rpq_fx.fit.quantize import row_errors


def summed(codebooks, codes):
    """``[N, C*d]`` by plain indexing: row n, slice c is ``Σ_m codebooks[m][c or 0, codes[m, c, n]]``."""
    stages, num, n = codes.shape
    out = 0
    for m in range(stages):
        cb = codebooks[m].double()
        group = torch.arange(num)[:, None] if cb.shape[0] > 1 else torch.zeros(num, 1, dtype=torch.long)
        out = out + cb[group, codes[m].long()].permute(1, 0, 2).reshape(n, -1)
    return out


def objective(rows, codebooks, codes, hessian=None, row_weights=None):
    delta = rows.double() - summed(codebooks, codes)
    return float(row_errors(delta, None if hessian is None else hessian.double(), row_weights).sum())


def problem(seed, n=48, c=3, d=2, k=4, stages=2, shared=True):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, c * d, generator=g)
    x = torch.randn(4 * c * d, c * d, generator=g) * torch.linspace(0.3, 2, c * d)
    x[:, 0] += x[:, -1]  # correlated inputs: H's off-diagonal blocks matter
    hessian = x.T @ x
    groups = 1 if shared else c
    codebooks = [torch.randn(groups, k, d, generator=g).double() for _ in range(stages)]
    codes = torch.randint(0, k, (stages, c, n), generator=g)
    return rows, hessian, codebooks, codes


@pytest.mark.parametrize("stages", [2, 3])
def test_beam_search_as_wide_as_the_codebook_is_exhaustive_for_two_stages(stages):
    g = torch.Generator().manual_seed(stages)
    words = torch.randn(stages, 6, 3, generator=g)
    points = torch.randn(50, 3, generator=g) * 2
    start = torch.randint(0, 6, (50, stages), generator=g)
    found = beam_codes(points, words, start.clone(), beam=6 ** (stages - 1))
    got = (points - words[torch.arange(stages), found].sum(1)).square().sum(1)
    every = torch.tensor(list(itertools.product(range(6), repeat=stages)))  # [6^M, M]
    sums = words[torch.arange(stages), every].sum(1)  # [6^M, d]
    best = torch.cdist(points, sums).square().min(1).values
    if stages == 2:
        torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)
    else:  # one sweep from the current codes: never farther than them, and as near as brute force on most points
        assert (got <= (points - words[torch.arange(stages), start].sum(1)).square().sum(1) + 1e-6).all()
        assert (got <= best + 1e-5).float().mean() > 0.9


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("data", ["hessian", "weights", "plain"])
def test_search_lowers_every_row_and_finds_a_better_assignment(shared, data):
    rows, hessian, codebooks, codes = problem(1, shared=shared)
    h = hessian if data == "hessian" else None
    f = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(2)) + 0.1 if data == "weights" else None
    before = row_errors(rows.double() - summed(codebooks, codes), None if h is None else h.double(), f)
    searched = search_codes(rows, codebooks, codes.clone(), h)
    after = row_errors(rows.double() - summed(codebooks, searched), None if h is None else h.double(), f)
    assert (after <= before * (1 + 1e-6) + 1e-9).all()
    assert after.sum() < 0.5 * before.sum()  # random codes are far from the best ones
    if h is None:  # slices are independent: each is the exhaustive best pair
        every = torch.tensor(list(itertools.product(range(4), repeat=2)))
        for c in range(3):
            words = torch.stack([cb[c if cb.shape[0] > 1 else 0] for cb in codebooks]).float()
            sums = words[torch.arange(2), every].sum(1)
            best = torch.cdist(rows[:, 2 * c:2 * c + 2], sums).square().min(1).values
            got = (rows[:, 2 * c:2 * c + 2] - words[torch.arange(2), searched[:, c].t()].sum(1)).square().sum(1)
            torch.testing.assert_close(got, best, atol=1e-5, rtol=1e-5)


def dense_lstsq(rows, codes, groups, k, hessian, row_weights):
    """The fitted rows of the least-squares codebooks, by ``torch.linalg.lstsq`` on the explicit design matrix:
    unknowns ``[M, G, K, d]`` flattened, one equation per row and column (times ``L``ᵀ, ``H = L Lᵀ``, or sqrt(f_n))."""
    stages, num, n = codes.shape
    d = rows.shape[1] // num
    unknowns = stages * groups * k * d
    design = torch.zeros(n, num * d, unknowns, dtype=torch.float64)
    for m, c, row, i in itertools.product(range(stages), range(num), range(n), range(d)):
        g = c if groups > 1 else 0
        design[row, c * d + i, ((m * groups + g) * k + int(codes[m, c, row])) * d + i] += 1
    target = rows.double()
    if hessian is not None:
        factor = torch.linalg.cholesky(hessian.double())  # H = L Lᵀ: Δ H Δᵀ = ||Δ L||²
        a, b = torch.einsum("nwu,wv->nvu", design, factor), target @ factor
    else:
        scale = torch.ones(n, dtype=torch.float64) if row_weights is None else row_weights.double().sqrt()
        a, b = design * scale.view(-1, 1, 1), target * scale.view(-1, 1)
    x = torch.linalg.lstsq(a.reshape(-1, unknowns), b.reshape(-1, 1)).solution
    return (design @ x).squeeze(-1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("data", ["hessian", "weights", "plain"])
def test_least_squares_codebooks_equal_a_dense_lstsq(shared, data):
    rows, hessian, codebooks, _ = problem(3, n=40, shared=shared)
    g = torch.Generator().manual_seed(4)
    codes = torch.stack([torch.arange(40).remainder(4).view(1, -1).repeat(3, 1)[:, torch.randperm(40, generator=g)]
                         for _ in range(2)])  # every codeword used: the fitted rows are then unique
    h = hessian if data == "hessian" else None
    f = torch.rand(40, generator=g) + 0.1 if data == "weights" else None
    expected = dense_lstsq(rows, codes, codebooks[0].shape[0], 4, h, f)
    best = float(row_errors(rows.double() - expected, None if h is None else h.double(), f).sum())
    # the default solve: conjugate gradients (float32) within 1e-4 of the optimum, the direct solve at it
    default = objective(rows, solve_codebooks(rows, codebooks, codes, h, f), codes, h, f)
    assert best <= default <= best * (1 + (1e-4 if h is not None else 1e-9))
    # run to convergence, the H-weighted solve reaches lstsq's rows (float32 rounding apart)
    solved = solve_codebooks(rows, codebooks, codes, h, f, iters=200)
    torch.testing.assert_close(summed(solved, codes), expected, atol=1e-2 if h is not None else 1e-5, rtol=1e-4)
    assert objective(rows, solved, codes, h, f) == pytest.approx(best, rel=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), stages=st.integers(2, 3), shared=st.booleans(),
       data=st.sampled_from(["hessian", "weights", "plain"]), n=st.integers(20, 60), c=st.integers(1, 4),
       d=st.integers(1, 3))
def test_the_joint_fit_is_never_worse_than_the_greedy_one(seed, stages, shared, data, n, c, d):
    rows, hessian, _, _ = problem(seed, n=n, c=c, d=d)
    h = hessian if data == "hessian" else None
    f = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.1 if data == "weights" else None
    kwargs = dict(hessian=h, row_weights=f, damp=0.01, seed=seed)
    greedy, greedy_error = fit_additive(rows, stages, c, 8, shared, joint_rounds=0, product_start=False, **kwargs)
    joint, joint_error = fit_additive(rows, stages, c, 8, shared, **kwargs)
    total = objective(rows, [torch.zeros(1, 1, d)] * 1, torch.zeros(1, c, n, dtype=torch.long), h, f)
    for results, error in ((greedy, greedy_error), (joint, joint_error)):
        codes = torch.stack([r.codes.long() for r in results])
        assert error == pytest.approx(objective(rows, [r.codebooks for r in results], codes, h, f) / total,
                                      rel=1e-4, abs=1e-9)
    assert joint_error <= greedy_error * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("shared", [True, False])
def test_the_joint_fit_gains_on_a_correlated_layer_and_beats_one_codebook_at_the_same_code_bits(shared):
    rows, hessian, _, _ = problem(5, n=128, c=8, d=4)
    greedy = fit_additive(rows, 2, 8, 16, shared, hessian=hessian, damp=0.01, joint_rounds=0, product_start=False)[1]
    joint = fit_additive(rows, 2, 8, 16, shared, hessian=hessian, damp=0.01)[1]
    one = fit_rows(rows, 16, 16, shared, hessian=hessian).error  # d=2, one code: as many code bits as d=4, M=2
    assert joint < 0.95 * greedy and joint < one


@pytest.mark.parametrize("shared", [True, False])
def test_the_product_start_is_the_finer_product_quantizer_written_as_stages(shared):
    rows, hessian, _, _ = problem(6, n=64, c=2, d=4)
    start, error = _product_start(rows, 2, 2, lambda target, c: fit_rows(target, c, 8, shared, hessian=hessian))
    sub = fit_rows(rows, 4, 8, shared, hessian=hessian)
    expected = torch.ops.rpq_fx.expand(sub.codebooks.float(), sub.codes)
    codes = torch.stack([r.codes.long() for r in start])
    torch.testing.assert_close(summed([r.codebooks for r in start], codes).float(), expected)
    assert error == sub.error and all(r.codebooks.shape == (1 if shared else 2, 8, 4) for r in start)
