"""``rpq_fx::conv``: a convolution whose weight is expanded a block of output channels at a time.

``conv(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups)`` is
``F.conv{1,2,3}d(input, expand(codebooks, codes).view(weight_shape), bias, ...)`` (the weight's rows are
its output channels), computed with stock torch ops: for each block of output channels (whole groups),
the block's rows are expanded and convolved, and the blocks' outputs concatenated. Its backward rebuilds
each block the same way; no dense weight is kept for it.

Why blocks (benchmarks/model_speed.py, timm resnet50's 512x512x3x3 convolutions under ``rpq_fx.RPQ``):
a weight expanded whole is a fresh 9.4 MB tensor every call, and oneDNN reorders it into another
fresh buffer. glibc hands buffers that large back to the system when they are freed (until a larger one
has been freed: its thresholds rise with the largest), so such a call can pay ~4600 page faults: 14-22 ms
against the dense convolution's 1.8 ms (batch 1, one thread), though the expansion itself takes 0.2 ms.
Blocks of :data:`BLOCK_BYTES` stay in the heap: 2.1-2.3 ms. Each block reads the whole input again, so
blocks are used only where the call's input is small beside the weight (:func:`_blocked`); a large input
means the process has freed buffers larger than the weight already, which glibc then keeps.

A compressed-domain convolution (codewords as the filters of a grouped convolution, one per slice of whole
input channels, then a gather-sum over the codes) computes ``K / out_channels`` of the dense products
before its gather; measured on that 512x512x3x3 layer (slices of 8 channels, K = 256, one thread) its
grouped convolution alone took 0.8x the dense convolution at batch 1 and 5.6x at batch 32, the gather-sum
brought batch 1 to 1.4x: it does not pay here, and ``rpq_fx.RPQ``'s 64-value slices of 3x3 kernels do not
cover whole channels anyway.

Only weights above :data:`BLOCK_BYTES` are worth the op (:func:`blocks_pay`): below it one block is
the whole weight, which ``expand`` + ``F.conv`` compute the same way.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import _require, check_devices, check_expand
from .library import expand

__all__ = ["conv", "BLOCK_BYTES", "blocks_pay"]

# Expanded weight per block (benchmarks/results/model_speed.md). resnet50 at batch 1, one thread: with every conv
# expanded whole 11616 page faults a call and 1.25x dense; in 2 MiB blocks none and 1.04x. Smaller blocks fault less
# alone in a fresh process (2 MiB 1062-1614 a call there, 1 MiB 5-224: glibc's trim threshold rises with the largest
# block freed so far) but each block more is one more convolution call, one more barrier for two threads: on the
# shared, loaded machine, two threads, resnet50 at batch 1 ran 1.33-1.35x dense in 1 or 2 MiB blocks, 1.02-1.07x
# unfused (to be retimed quiet).
BLOCK_BYTES = 2 * 2**20
_ROW_MULTIPLE = 16  # output channels per block, where a block holds more: oneDNN's vector width in float32
# Blocks only where input bytes * INPUT_RATIO < weight bytes: each block reads the whole input again. resnet50 at
# batch 32 (two threads, load 16): every conv expanded whole 1.08x dense, its big ones in 2 MiB blocks 1.16x.
INPUT_RATIO = 4

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def blocks_pay(weight_shape, dtype: torch.dtype) -> bool:
    """Whether a weight of ``weight_shape`` expanded in ``dtype`` is big enough to be expanded in blocks."""
    return math.prod(weight_shape) * dtype.itemsize > BLOCK_BYTES


def _blocks(weight_shape: list[int], groups: int, itemsize: int) -> list[slice]:
    """Output channels expanded at a time: whole groups, about :data:`BLOCK_BYTES` of weight each."""
    out_channels, row = weight_shape[0], math.prod(weight_shape[1:])
    unit = out_channels // groups if groups > 1 else 1  # a block never splits a group
    rows = BLOCK_BYTES // max(1, row * itemsize) // unit * unit
    if rows > _ROW_MULTIPLE and unit == 1:
        rows = rows // _ROW_MULTIPLE * _ROW_MULTIPLE
    rows = max(unit, rows)
    return [slice(n, min(n + rows, out_channels)) for n in range(0, out_channels, rows)]


def _blocked(input: Tensor, weight_shape: list[int]) -> bool:
    """Whether this call expands its weight in blocks: a weight above one block, and an input small beside it."""
    return (blocks_pay(weight_shape, input.dtype)
            and input.numel() * INPUT_RATIO < math.prod(weight_shape))  # both sizes in input.dtype's items


def _parts(input: Tensor, weight_shape: list[int], groups: int) -> list[tuple[slice, slice, int]]:
    """``(output channels, input channels, groups)`` of each block's convolution (one block unless
    :func:`_blocked`)."""
    itemsize = input.element_size()
    if not _blocked(input, weight_shape):
        return [(slice(0, weight_shape[0]), slice(None), groups)]
    if groups == 1:
        return [(rows, slice(None), 1) for rows in _blocks(weight_shape, 1, itemsize)]
    cin, per_group = weight_shape[1], weight_shape[0] // groups
    return [(rows, slice(rows.start // per_group * cin, rows.stop // per_group * cin),
             (rows.stop - rows.start) // per_group) for rows in _blocks(weight_shape, groups, itemsize)]


def _check(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None, weight_shape: list[int],
           stride: list[int], padding: list[int], dilation: list[int], groups: int) -> int:
    """Validate a call; returns the number of spatial dims."""
    op = "rpq_fx conv"
    check_devices(op, input=input, codebooks=codebooks, codes=codes, bias=bias)
    check_expand(codebooks, codes, op)
    dims = len(weight_shape) - 2
    _require(dims in _CONV, lambda: f"{op}: weight_shape must be [out, in / groups, *kernel] with 1-3 kernel dims, "
                                    f"got {list(weight_shape)}")
    _require(all(isinstance(s, int) and s > 0 for s in weight_shape),
             lambda: f"{op}: weight_shape must be positive ints, got {list(weight_shape)}")
    row = math.prod(weight_shape[1:])
    _require(codes.shape[1] == weight_shape[0] and codes.shape[0] * codebooks.shape[2] == row,
             lambda: f"{op}: codes {tuple(codes.shape)} with codewords of {codebooks.shape[2]} values expand to "
                     f"[{codes.shape[1]}, {codes.shape[0] * codebooks.shape[2]}], not weight_shape "
                     f"{list(weight_shape)}")
    for name, value in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        _require(len(value) == dims, lambda: f"{op}: {name} must have {dims} values, got {list(value)}")
    _require(isinstance(groups, int) and groups >= 1 and weight_shape[0] % groups == 0,
             lambda: f"{op}: groups must be a positive divisor of {weight_shape[0]} output channels, got {groups}")
    _require(input.dim() in (dims + 1, dims + 2) and input.shape[-dims - 1] == weight_shape[1] * groups,
             lambda: f"{op}: input {tuple(input.shape)} must be [batch, {weight_shape[1] * groups}, *{dims} dims] "
                     f"(or unbatched) for weight_shape {list(weight_shape)} and groups={groups}")
    _require(codebooks.dtype == input.dtype,
             lambda: f"{op}: codebooks ({codebooks.dtype}) and input ({input.dtype}) must have one dtype")
    _require(bias is None or tuple(bias.shape) == (weight_shape[0],),
             lambda: f"{op}: bias must be [{weight_shape[0]}], got {None if bias is None else tuple(bias.shape)}")
    return dims


@torch.library.custom_op("rpq_fx::conv", mutates_args=())
def conv(input: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None, weight_shape: list[int],
         stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    """``F.conv{n}d(input, expand(codebooks, codes).view(weight_shape), bias, stride, padding, dilation, groups)``,
    the weight expanded a block of output channels at a time (see the module docstring)."""
    dims = _check(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups)
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input
    outs = []
    for rows, channels, block_groups in _parts(x, weight_shape, groups):
        weight = expand(codebooks, codes[:, rows]).view(rows.stop - rows.start, *weight_shape[1:])
        outs.append(_CONV[dims](x[:, channels], weight, None if bias is None else bias[rows], stride, padding,
                                dilation, block_groups))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.squeeze(0) if unbatched else out


@conv.register_fake
def _(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups):
    dims = _check(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups)
    return _CONV[dims](input, codebooks.new_empty(weight_shape), bias, stride, padding, dilation, groups)


def _setup_context(ctx, inputs, output):
    input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, codebooks, codes)  # reason: never the dense weight; backward rebuilds each block
    ctx.args = (list(weight_shape), list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad):
    input, codebooks, codes = ctx.saved_tensors
    weight_shape, stride, padding, dilation, groups = ctx.args
    need_input, need_codebooks, _, need_bias = ctx.needs_input_grad[:4]
    dims = len(weight_shape) - 2
    unbatched = input.dim() == dims + 1
    x, g = (input.unsqueeze(0), grad.unsqueeze(0)) if unbatched else (input, grad)
    grad_x = torch.zeros_like(x) if need_input else None
    grad_cb = torch.zeros_like(codebooks) if need_codebooks else None
    if need_input or need_codebooks:
        for rows, channels, block_groups in _parts(x, weight_shape, groups):
            weight = expand(codebooks, codes[:, rows]).view(rows.stop - rows.start, *weight_shape[1:])
            gi, gw, _ = torch.ops.aten.convolution_backward(
                g[:, rows].contiguous(), x[:, channels], weight, None, stride, padding, dilation, False, [0] * dims,
                block_groups, [need_input, need_codebooks, False])
            if need_input:
                grad_x[:, channels] += gi
            if need_codebooks:
                torch.ops.rpq_fx._expand_backward_add(grad_cb, gw.reshape(rows.stop - rows.start, -1),
                                                      codes[:, rows])
    grad_bias = g.sum([0, *range(2, g.dim())]) if need_bias else None
    if grad_x is not None and unbatched:
        grad_x = grad_x.squeeze(0)
    return grad_x, grad_cb, None, grad_bias, None, None, None, None, None


conv.register_autograd(_backward, setup_context=_setup_context)
