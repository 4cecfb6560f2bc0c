"""``rpq_fx::conv``: a convolution whose weight is expanded a block of output channels at a time, or that computes
from its codes where that pays.

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
cover whole channels anyway (the unfolded form below does not need them to).

A pointwise convolution (1x1 kernel, no padding, one group; a stride subsamples the input first) is different:
its weight is a linear layer's, ``[out, in]`` split into slices of whole input channels, so it is computed in the
compressed domain (:func:`_pointwise`) with no weight built, in the input's own layout: per slice ``c``, tables
``T[c] = codebooks[c] @ x[c-th channels]`` (``[K, H*W]``, one batched matmul: ``K * in`` products per pixel),
then for each output channel the sum of its ``C`` table rows (``F.embedding_bag``, ``C * out`` adds per pixel),
against ``out * in`` products densely: ``1 / (K/out + 1/d)`` of the work. It computes where that saving is at least
:data:`MIN_SAVING` (:func:`pointwise_pays`), unless :func:`~rpq_fx.ops.compute_path` forces a path. Measured
(timm resnet50's 1x1 layers under ``rpq_fx.RPQ``, K = 256, d = 64, float32, two threads, fastest of 15 calls, CPU
time against dense ``F.conv2d``): out = 1024 / 2048 (savings 3.8 / 7.1) took 0.15-0.78x dense at every batch from
1 to 32; out = 512 (1.9) took 1.0-1.5x, so it keeps the expansion. ``rpq_fx::linear`` on the channels-last view
(a permuted copy of the input and of the output) took 1.7x dense at out = 1024 and 0.8x at 2048, batch 1: the two
copies cost more than its kernel saves there.

A bigger ungrouped 2-D convolution computes the same way on its unfolded input (``F.unfold``: each output
position's receptive field is a row in the weight's own order) where the weight dwarfs that input
(:data:`UNFOLD_RATIO`): resnet50's layer4 3x3 convolutions at batch 1, where expanding 9.4 MB costs more than their
products. It saves less there (1.9x of the products) and does not pay at batch 2.

A strided 1x1 convolution that expands its weight convolves the subsampled input with stride 1: oneDNN's strided
1x1 convolution was up to 4x slower than that. Other weights are worth the op only above :data:`BLOCK_BYTES`
(:func:`blocks_pay`): below it one block is the whole weight, which ``expand`` + ``F.conv`` compute the same way.
:func:`fused_pays` says which layers to fuse into the op.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import _require, check_codes, check_devices, check_expand
from .library import expand
from .policy import forced_path

__all__ = ["conv", "BLOCK_BYTES", "MIN_SAVING", "UNFOLD_MIN_SAVING", "UNFOLD_RATIO", "blocks_pay", "pointwise_pays",
           "fused_pays"]

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

# A pointwise convolution computes in the compressed domain where dense products / compressed ones, 1 / (K/out + 1/d),
# reach this (module docstring: it paid at 3.8 and 7.1, not at 1.9)
MIN_SAVING = 3.0
# Tables computed at a time by the pointwise path (whole images): a fresh buffer this small is recycled by glibc, a
# bigger one can cost page faults each call (resnet50's layer3 at batch 32: 25 MB of tables in one go, 14 ms a call
# with faults against 6 ms in 4 MiB parts)
TABLE_BYTES = 4 * 2**20
# Another ungrouped 2-D convolution computes from its codes on its unfolded input where it saves at least
# UNFOLD_MIN_SAVING of the products and unfolded input * UNFOLD_RATIO <= weight (values): resnet50's layer4 3x3
# (512x512x3x3, saving 1.9, two threads) took 0.97 ms at batch 1 (unfolded input 10x smaller than the weight)
# against 1.33 in blocks (dense 0.83), and 1.84 against 1.73 at batch 2 (5x smaller)
UNFOLD_MIN_SAVING = 1.5
UNFOLD_RATIO = 8

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def blocks_pay(weight_shape, dtype: torch.dtype) -> bool:
    """Whether a weight of ``weight_shape`` expanded in ``dtype`` is big enough to be expanded in blocks."""
    return math.prod(weight_shape) * dtype.itemsize > BLOCK_BYTES


def _is_pointwise(weight_shape, padding, groups) -> bool:
    """A 1x1 kernel, no padding, one group: a linear layer applied at every (strided) position."""
    return groups == 1 and all(k == 1 for k in weight_shape[2:]) and not any(padding)


def _saving(out_channels: int, num_codes: int, codebook_dim: int) -> float:
    """Dense products / products from the codes, ``1 / (K/out + 1/d)`` (the module docstring)."""
    return 1 / (num_codes / out_channels + 1 / codebook_dim)


def pointwise_pays(weight_shape, padding, groups, num_codes: int, codebook_dim: int) -> bool:
    """Whether a convolution is pointwise and saves at least :data:`MIN_SAVING` of its products computed from
    ``num_codes`` codewords of ``codebook_dim`` values."""
    return (_is_pointwise(weight_shape, padding, groups)
            and _saving(weight_shape[0], num_codes, codebook_dim) >= MIN_SAVING)


def _strided_1x1(weight_shape, stride, padding) -> bool:
    """A 1x1 kernel, no padding, a stride: the same as the unstrided convolution of the subsampled input."""
    return all(k == 1 for k in weight_shape[2:]) and not any(padding) and any(s > 1 for s in stride)


def fused_pays(weight_shape, dtype: torch.dtype, stride, padding, groups, codebooks_shape=None) -> bool:
    """Whether a convolution is worth ``rpq_fx::conv`` rather than ``expand`` + ``F.conv``: a weight above one block
    (:func:`blocks_pay`), a pointwise one that pays (:func:`pointwise_pays`; ``codebooks_shape`` ``[G, K, d]``,
    where known), or a strided 1x1 one (its input subsampled first: :func:`conv`)."""
    return (blocks_pay(weight_shape, dtype) or _strided_1x1(weight_shape, stride, padding)
            or (codebooks_shape is not None and pointwise_pays(weight_shape, padding, groups, codebooks_shape[1],
                                                               codebooks_shape[2])))


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _route(input: Tensor, codebooks: Tensor, codes: Tensor, weight_shape, stride, padding, dilation,
           groups) -> str | None:
    """How this call computes from the codes, if it does: ``"pointwise"`` (:func:`_pointwise` on the input),
    ``"unfold"`` (on the unfolded input of an ungrouped 2-D convolution) or None (the weight expanded). Where
    :func:`~rpq_fx.ops.compute_path` forces ``"compressed"``, wherever it can; otherwise on the CPU in float32 /
    float64 where it pays and one image's tables fit :data:`TABLE_BYTES`: a pointwise one by :func:`pointwise_pays`,
    another where it saves at least :data:`UNFOLD_MIN_SAVING` of the products and its unfolded input is small beside
    the weight (:data:`UNFOLD_RATIO`)."""
    if groups != 1 or not input.is_contiguous() or input.numel() == 0:
        return None
    kind = "pointwise" if _is_pointwise(weight_shape, padding, groups) else "unfold" if len(weight_shape) == 4 \
        else None
    path = forced_path("auto")
    if kind is None or path == "expand":
        return None
    if path == "compressed":
        return kind
    if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
        return None
    num_codes, dim = codebooks.shape[1:]
    positions = math.prod(_output_size(input.shape[2 + i], weight_shape[2 + i], stride[i], padding[i], dilation[i])
                          for i in range(len(weight_shape) - 2))
    # reason: measured only where one image's tables fit TABLE_BYTES; above it each image's are a fresh buffer
    # (512 -> 2048 channels at 28x28, batch 8: 6.4 MB of tables an image, 1.6x dense's time)
    if codes.shape[0] * num_codes * positions * input.element_size() > TABLE_BYTES:
        return None
    if kind == "pointwise":
        return kind if pointwise_pays(weight_shape, padding, groups, num_codes, dim) else None
    unfolded = input.shape[0] * positions * math.prod(weight_shape[1:])
    saving = _saving(weight_shape[0], num_codes, dim)
    return kind if saving >= UNFOLD_MIN_SAVING and unfolded * UNFOLD_RATIO <= math.prod(weight_shape) else None


def _unfolded(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None, weight_shape, stride, padding,
              dilation) -> Tensor:
    """An ungrouped 2-D convolution from codebooks and codes: :func:`_pointwise` on ``F.unfold(x)`` (its rows are
    the weight's rows' order: input channel, then kernel row and column)."""
    cols = F.unfold(x, weight_shape[2:], dilation, padding, stride)  # [batch, in * kh * kw, positions]
    size = [_output_size(x.shape[2 + i], weight_shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)]
    return _pointwise(cols, codebooks, codes, bias, [1]).view(x.shape[0], weight_shape[0], *size)


def _pointwise(x: Tensor, codebooks: Tensor, codes: Tensor, bias: Tensor | None, stride: list[int]) -> Tensor:
    """A pointwise convolution of a batched input from codebooks and codes (module docstring): per slice of
    channels a table ``codebooks[c] @ x[c-th channels]``, then each output channel the sum of its codes' rows."""
    if any(s > 1 for s in stride):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
    batch, _, *spatial = x.shape
    num_codebooks, out_channels = codes.shape
    num_codes, dim = codebooks.shape[1:]
    check_codes(codes, num_codes, "rpq_fx conv")
    pixels = math.prod(spatial)
    images = max(1, min(batch, TABLE_BYTES // max(1, num_codebooks * num_codes * pixels * x.element_size())))
    index = codes.to(torch.int64)
    if codes.dtype == torch.int16:
        index = index & 0xFFFF  # reason: codes above 32767 are stored as int16 bit patterns
    index = index.t() + torch.arange(0, num_codebooks * num_codes, num_codes, device=codes.device)  # [out, C]
    # reason: one bmm over the slices with the images side by side; matmul's broadcast over images copied the
    # codebooks once per image (10-17% of the time at batch 8-32)
    codebooks = codebooks.expand(num_codebooks, num_codes, dim)
    parts = []
    for start in range(0, batch, images):
        part = x[start:start + images]
        count = part.shape[0]
        columns = part.reshape(count, num_codebooks, dim, pixels).permute(1, 2, 0, 3).reshape(num_codebooks, dim, -1)
        tables = torch.bmm(codebooks, columns)  # [C, K, count * pixels]: rows of pixels by (c, k, image)
        # bag (image i, output channel n) sums rows (c * K + codes[c, n]) * count + i, c < C
        bags = (index * count + torch.arange(count, device=codes.device).view(count, 1, 1)).reshape(-1, num_codebooks)
        parts.append(F.embedding_bag(bags, tables.view(-1, pixels), mode="sum"))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None:
        out.view(batch, out_channels, pixels).add_(bias.view(-1, 1))
    return out.view(batch, out_channels, *spatial)


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
    the weight expanded a block of output channels at a time, or computed from the codes (see the module
    docstring)."""
    dims = _check(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups)
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input
    route = _route(x, codebooks, codes, weight_shape, stride, padding, dilation, groups)
    if route is not None:
        out = (_pointwise(x, codebooks, codes, bias, stride) if route == "pointwise"
               else _unfolded(x, codebooks, codes, bias, weight_shape, stride, padding, dilation))
        return out.squeeze(0) if unbatched else out
    if _strided_1x1(weight_shape, stride, padding):
        # reason: oneDNN's strided 1x1 convolution took 2.02 ms where the same on the subsampled input took 0.50
        # (resnet50's layer2 downsample, 256 -> 512 channels, 56x56, batch 1; 70 against 60 ms at batch 32)
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        stride = [1] * dims
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
