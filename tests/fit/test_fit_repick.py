"""repick_codes (PV-tuning's discrete step on one weight, rpq_fx.fit.repick) against a brute-force search:
with every slice allowed, each slice ends at a codeword nearest the target; with a fraction, only the slices
whose move lowers the loss most to first order move."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rpq_fx.fit.repick import repick_codes
from rpq_fx.nn.weight import RPQWeight


def _weight(shared: bool, rows: int, seed: int) -> RPQWeight:
    weight = RPQWeight(3, 2, rows, 8, shared)
    weight.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return weight


def _slices(weight: RPQWeight, values: torch.Tensor) -> torch.Tensor:
    return values.reshape(weight.num_vectors, weight.num_codebooks, weight.codebook_dim)


def _words(weight: RPQWeight) -> torch.Tensor:
    """``[C, K, d]``: the codebook each slice position reads."""
    return weight.codebooks.detach().expand(weight.num_codebooks, -1, -1)


@settings(max_examples=25, deadline=None)
@given(shared=st.booleans(), rows=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_every_slice_allowed_ends_at_a_nearest_codeword(shared, rows, seed):
    weight = _weight(shared, rows, seed)
    before = weight.expand_rows().detach().clone()
    target = torch.randn(before.shape, generator=torch.Generator().manual_seed(seed + 1))
    old_codes = weight.codes.clone()
    with torch.no_grad():
        changed = repick_codes(weight, target, before - target, beam=8, fraction=1.0)
    # brute force: each slice's distance to the target from every codeword of its codebook
    distances = (_slices(weight, target).unsqueeze(2) - _words(weight).unsqueeze(0)).square().sum(-1)  # [N, C, K]
    got = (_slices(weight, weight.expand_rows().detach()) - _slices(weight, target)).square().sum(-1)
    torch.testing.assert_close(got, distances.min(-1).values, rtol=1e-5, atol=1e-6)
    assert changed == int((weight.codes != old_codes).sum())
    stayed = weight.codes == old_codes  # [C, N]: a slice that did not move was already at a nearest codeword
    assert torch.equal(_slices(weight, weight.expand_rows().detach()).transpose(0, 1)[stayed],
                       _slices(weight, before).transpose(0, 1)[stayed])


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_a_fraction_moves_only_the_slices_of_most_first_order_gain(fraction):
    weight = _weight(False, 40, 3)
    before = weight.expand_rows().detach().clone()
    g = torch.Generator().manual_seed(4)
    target = before + 0.3 * torch.randn(before.shape, generator=g)
    grad = torch.randn(before.shape, generator=g)  # any gradient: the choice is by its first-order gain
    full = _weight(False, 40, 3)
    with torch.no_grad():
        repick_codes(full, target, grad, beam=8, fraction=1.0)
        moved = _slices(full, full.expand_rows()) - _slices(weight, before)
        gain = (moved * _slices(weight, grad)).sum(-1)  # [N, C]
        repick_codes(weight, target, grad, beam=8, fraction=fraction)
    keep = int(fraction * gain.numel())
    best = gain.flatten().topk(keep, largest=False).indices
    chosen = torch.zeros(gain.numel(), dtype=torch.bool)
    chosen[best[gain.flatten()[best] < 0]] = True
    assert 0 < int(chosen.sum()) <= keep
    moved_here = (weight.codes != _weight(False, 40, 3).codes).t().flatten()  # [N * C] in (row, slice) order
    assert torch.equal(moved_here, chosen)
