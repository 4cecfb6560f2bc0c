"""Codes re-picked toward a target weight, the codebooks fixed: PV-tuning's discrete step
(:func:`~rpq_fx.finetune.code_step`, Malinovskii et al., 2024) on one RPQ weight.

:func:`repick_codes` sets every slice's codes to those whose codewords (summed over the stages) lie
nearest the target, searched from the current codes (one code: the nearest codeword; M codes:
:func:`~rpq_fx.fit.additive.beam_codes`), and keeps the change only on the slices where, to first order
in the loss's gradient, it gains most.
"""

import torch
from torch import Tensor

from ..nn.weight import RPQWeight
from .additive import beam_codes
from .kmeans import nearest

__all__ = ["repick_codes"]


def _reserved(weight: RPQWeight) -> Tensor | None:
    """The rows that read the last codeword in every stage and slice while it is zero everywhere (an
    embedding's padding row, :meth:`RPQWeight.reset_parameters`'s ``zero_rows``): their codes stay, and no
    other row may take that codeword (its zero would then train)."""
    last = weight.num_codes - 1
    if any(stage.codebooks[:, last].any() for stage in weight.stages()):
        return None
    rows = torch.ones(weight.num_vectors, dtype=torch.bool, device=weight.codes.device)
    for stage in weight.stages():
        rows &= (stage.codes.long() % weight.num_codes == last).all(0)
    return rows if rows.any() else None


def _sum_words(weight: RPQWeight, codes: Tensor) -> Tensor:
    """``[N, C, d]``: each slice's codewords summed over the stages, for ``codes [M, C, N]``."""
    stages = weight.stages()
    c = weight.num_codebooks
    group = torch.arange(c, device=codes.device).view(-1, 1) if weight.codebooks.shape[0] > 1 else 0
    return sum(s.codebooks.detach().float()[group, codes[m]] for m, s in enumerate(stages)).transpose(0, 1)


def repick_codes(weight: RPQWeight, target: Tensor, grad: Tensor, *, beam: int, fraction: float) -> int:
    """Set ``weight``'s codes to those nearest ``target [N, C*d]`` (see the module docstring) on the ``fraction``
    of its slices where the move gains most to first order (``grad [N, C*d]``: the loss's gradient); how many
    codes changed."""
    stages = weight.stages()
    k, c, d = weight.num_codes, weight.num_codebooks, weight.codebook_dim
    codes = torch.stack([s.codes.long() % k for s in stages])  # [M, C, N]
    reserved = _reserved(weight)
    slices = target.float().reshape(-1, c, d)
    new = codes.clone()
    for slot in range(weight.codebooks.shape[0]):  # one shared codebook, or one per slice position
        positions = slice(None) if weight.codebooks.shape[0] == 1 else slice(slot, slot + 1)
        words = torch.stack([s.codebooks[slot].detach().float() for s in stages])  # [M, K, d]
        if reserved is not None:
            # reason: far enough never to be nearest, near enough that squared distances stay finite in float32
            words[:, -1] = 1e18
        points = slices[:, positions].transpose(0, 1).reshape(-1, d)  # (slice, row) order, as codes[:, positions]
        current = codes[:, positions].reshape(len(stages), -1).t()
        if len(stages) == 1:
            found = nearest(points.unsqueeze(0), words)[0].long().view(-1, 1)
            before = (points - words[0][current[:, 0]]).square().sum(1)
            after = (points - words[0][found[:, 0]]).square().sum(1)
            found = torch.where((after < before).unsqueeze(1), found, current)
        else:
            found = beam_codes(points, words, current, beam)
        new[:, positions] = found.t().reshape(len(stages), -1, weight.num_vectors)
    if reserved is not None:
        new[:, :, reserved] = codes[:, :, reserved]
    # reason: a code flip moves its slice by a whole codeword gap, far past where the gradient's linear model holds;
    # PV-tuning likewise updates only a small subspace of the codes per step
    moved = _sum_words(weight, new) - _sum_words(weight, codes)  # [N, C, d]
    gain = (moved * grad.float().reshape(moved.shape)).sum(-1)  # [N, C]: the loss's first-order change
    keep = int(fraction * gain.numel())
    flat = gain.view(-1)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if keep:
        best = flat.topk(keep, largest=False).indices
        chosen[best[flat[best] < 0]] = True
    chosen = chosen.view(gain.shape).t()  # [C, N]
    new = torch.where(chosen.unsqueeze(0), new, codes)
    changed = int((new != codes).sum())
    for stage, value in zip(stages, new):
        stage.codes.copy_(value.to(stage.codes.dtype))
    return changed
