"""Validation shared by every rpq_fx op: shapes, dtypes and devices (also in the fake kernels, so
meta and fake tensors are checked too) and the codes' values (:func:`check_codes`), so that no input
can make a kernel read or write outside its buffers (issue 19).

Errors name the op, the value that was wrong and what would be accepted.
"""

import torch
from torch import Tensor

__all__ = ["check_codes", "check_devices", "check_expand", "check_expand_backward", "check_linear",
           "check_linear_backward", "check_embedding", "check_indices"]

_CODE_DTYPES = (torch.uint8, torch.int16)


def _require(cond, message) -> None:
    """``torch._check`` (symbolic shapes under fake tensors too), with a fast path for a plain ``True``."""
    if cond is not True:  # reason: torch._check costs ~0.7 us a call: a few percent of a batch-1 linear
        torch._check(cond, message)


def _require_type(cond, message) -> None:
    """:func:`_require` raising ``TypeError``."""
    if cond is not True:
        torch._check_type(cond, message)


def check_codes(codes: Tensor, num_codes: int, where: str) -> None:
    """Raise ``IndexError`` naming ``where`` unless ``codes`` are uint8 / int16 codes all below ``num_codes``.

    int16 codes are read as unsigned bit patterns (codes above 32767). The one check every entry
    point (ops, ``RPQWeight`` state, checkpoints) shares, so no code can index past a codebook; the
    C++ kernels make the same check inline (``check_codes`` in csrc/rpq_kernels.cpp).
    """
    if codes.dtype not in _CODE_DTYPES:
        raise TypeError(f"{where}: codes must be uint8 or int16, got {codes.dtype}")
    capacity = 256 if codes.dtype == torch.uint8 else 65536
    if num_codes >= capacity or codes.numel() == 0 or codes.is_meta:
        return
    if codes.dtype == torch.uint8:
        largest = int(codes.max())
    else:
        low, high = torch.aminmax(codes)
        # reason: a negative int16 is a code above 32767; only then is the unsigned view worth its copy
        largest = int(high) if int(low) >= 0 else int((codes.to(torch.int32) & 0xFFFF).max())
    if largest >= num_codes:
        raise IndexError(f"{where}: code {largest} is out of range for {num_codes} codewords "
                         f"(codes must be < {num_codes})")


def _check_code_dtype(codes: Tensor, op: str) -> None:
    _require_type(codes.dtype in _CODE_DTYPES, lambda: f"{op}: codes must be uint8 or int16, got {codes.dtype}")


def check_devices(op: str, **tensors: Tensor | None) -> None:
    """All tensors on one device, as a dense layer requires: a meta weight called on a CPU input must
    raise, not hand back an uninitialised CPU tensor (issue 19). (On every op call: compared one by one,
    the message built only when they differ.)"""
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            where = ", ".join(f"{name} on {t.device}" for name, t in tensors.items() if t is not None)
            raise RuntimeError(f"{op}: tensors on different devices ({where}); all must be on one device")


def check_expand(codebooks: Tensor, codes: Tensor, op: str = "rpq_fx expand") -> None:
    """Shapes and dtypes of ``expand(codebooks [G, K, d], codes [C, N])``, G = C or 1 (values: :func:`check_codes`)."""
    check_devices(op, codebooks=codebooks, codes=codes)
    _check_expand_shapes(codebooks, codes, op)


def _check_expand_shapes(codebooks: Tensor, codes: Tensor, op: str) -> None:
    _require(codebooks.dim() == 3, lambda: f"{op}: codebooks must be [G, K, d], got {tuple(codebooks.shape)}")
    _require(codes.dim() == 2, lambda: f"{op}: codes must be [C, N], got {tuple(codes.shape)}")
    _check_code_dtype(codes, op)
    _require(codebooks.shape[0] in (1, codes.shape[0]),
             lambda: f"{op}: {codebooks.shape[0]} codebooks for {codes.shape[0]} slices (want {codes.shape[0]} or 1)")


def check_expand_backward(grad: Tensor, codes: Tensor, num_groups: int, num_codes: int) -> None:
    op = "rpq_fx expand_backward"
    check_devices(op, grad=grad, codes=codes)
    _require(codes.dim() == 2 and codes.shape[0] >= 1,
             lambda: f"{op}: codes must be [C, N] with C >= 1, got {tuple(codes.shape)}")
    _check_code_dtype(codes, op)
    _require(grad.dim() == 2 and grad.shape[0] == codes.shape[1] and grad.shape[1] % codes.shape[0] == 0,
             lambda: f"{op}: grad must be [N, C*d] = [{codes.shape[1]}, {codes.shape[0]}*d] for codes "
                     f"{tuple(codes.shape)}, got {tuple(grad.shape)}")
    _require(num_groups in (1, codes.shape[0]),
             lambda: f"{op}: num_groups must be {codes.shape[0]} or 1, got {num_groups}")
    _require(num_codes >= 1, lambda: f"{op}: num_codes must be positive, got {num_codes}")


def check_linear(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None,
                 op: str = "rpq_fx linear") -> None:
    check_devices(op, input=input, codebooks=codebooks, codes=codes, bias=bias)
    _check_expand_shapes(codebooks, codes, op)
    _require(input.dim() >= 1 and input.shape[-1] == codes.shape[0] * codebooks.shape[2],
             lambda: f"{op}: input has {input.shape[-1] if input.dim() else 0} features, the weight "
                     f"{codes.shape[0]}x{codebooks.shape[2]} = {codes.shape[0] * codebooks.shape[2]}")
    _require(bias is None or tuple(bias.shape) == (codes.shape[1],),
             lambda: f"{op}: bias must be [{codes.shape[1]}], got {tuple(bias.shape)}")


def check_linear_backward(grad: Tensor, input: Tensor, codebooks: Tensor, codes: Tensor) -> None:
    check_devices("rpq_fx linear_backward", grad=grad, input=input)
    check_linear(input, codebooks, codes, None, "rpq_fx linear_backward")
    _require(grad.shape == (*input.shape[:-1], codes.shape[1]),
             lambda: f"rpq_fx linear_backward: grad must be {(*input.shape[:-1], codes.shape[1])} for input "
                     f"{tuple(input.shape)} and {codes.shape[1]} outputs, got {tuple(grad.shape)}")
    _require(grad.dtype == input.dtype,
             lambda: f"rpq_fx linear_backward: grad is {grad.dtype}, input {input.dtype}: want one dtype")


def check_embedding(indices: Tensor, codebooks: Tensor, codes: Tensor, padding_idx: int | None) -> int | None:
    check_devices("rpq_fx embedding", indices=indices, codebooks=codebooks, codes=codes)
    check_expand(codebooks, codes, "rpq_fx embedding")
    _require(not indices.is_floating_point() and not indices.is_complex(),
             lambda: f"rpq_fx embedding: indices must be integers, got {indices.dtype}")
    num_embeddings = codes.shape[1]
    if padding_idx is None:
        return None
    _require(-num_embeddings <= padding_idx < num_embeddings,
             lambda: f"rpq_fx embedding: padding_idx must be within num_embeddings={num_embeddings}, got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def check_indices(indices: Tensor, num_embeddings: int) -> None:
    """Every index in ``[0, num_embeddings)``, as ``F.embedding`` requires (a real tensor's values)."""
    if indices.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(indices))
    if low < 0 or high >= num_embeddings:
        bad = low if low < 0 else high
        raise IndexError(f"rpq_fx embedding: index {bad} is out of range for {num_embeddings} rows "
                         f"(indices must be in [0, {num_embeddings}))")
