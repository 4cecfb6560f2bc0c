"""ONNX export of a converted model, the expansion lowered to standard ONNX ops.

``torch.onnx.export(..., dynamo=True)`` captures the model with ``torch.export`` (where the
expansion is one ``rpq_fx::expand`` node) and translates each node to ONNX. ``rpq_fx::expand``
becomes::

    index = Cast(codes -> int64)            [C, N]   (int16 codes: BitwiseAnd 0xFFFF, read unsigned)
    index = Transpose(index) + c * K        [N, C]   (the row of codebook c in the flat table)
    W     = Gather(Reshape(codebooks, [G*K, d]), index) -> Reshape [N, C*d]

The compressed-domain ops (``rpq_fx::linear``, ``rpq_fx::embedding``, where the model has them)
become that expansion followed by ``MatMul`` (+ bias), and a Gather of the looked-up rows' codes
followed by the codebook Gather.

Constant folding would turn that into the dense weight, stored in the file; it is switched off for
these nodes (and only these), so the file holds the codebooks and the uint8 codes: about
``model_size`` bytes, not the dense size (plus, for an embedding with hot rows, each row's hot
slot: 4 bytes per row). onnxruntime computes what PyTorch computes.

Needs ``onnx``, ``onnxscript`` (and ``onnxruntime`` to run the result): ``pip install 'rpq_fx[onnx]'``.
"""

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._optional import require

__all__ = ["export_onnx", "onnx_translation_table", "keep_expansions"]


def _require():
    return require("onnxscript", "onnx", "export_onnx"), require("onnx_ir", "onnx", "export_onnx")


def _table_and_index(codebooks, codes):
    """``Reshape(codebooks, [G*K, d])`` and each ``(n, c)``'s row in it, ``[N, C]`` int64."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript import opset18 as op

    groups, num_codes, dim = (int(s) for s in codebooks.shape)
    num_codebooks = int(codes.shape[0])
    index = op.Cast(codes, to=ir.DataType.INT64)
    if codes.dtype == ir.DataType.INT16:
        index = op.BitwiseAnd(index, op.Constant(value=ir.tensor(np.array(0xFFFF, dtype=np.int64))))
    index = op.Transpose(index, perm=[1, 0])
    if groups > 1:
        offsets = np.arange(num_codebooks, dtype=np.int64)[None, :] * num_codes
        index = op.Add(index, op.Constant(value=ir.tensor(offsets)))
    table = op.Reshape(codebooks, op.Constant(value_ints=[groups * num_codes, dim]))
    return table, index


def _expand_onnx(codebooks, codes):
    """ONNX for ``rpq_fx::expand(codebooks [G, K, d], codes [C, N]) -> W [N, C*d]`` (static shapes)."""
    from onnxscript import opset18 as op

    num_codebooks, num_vectors = (int(s) for s in codes.shape)
    table, index = _table_and_index(codebooks, codes)
    rows = op.Gather(table, index, axis=0)
    return op.Reshape(rows, op.Constant(value_ints=[num_vectors, num_codebooks * int(codebooks.shape[2])]))


def _linear_onnx(input, codebooks, codes, bias=None, path: str = "auto"):
    """ONNX for ``rpq_fx::linear``: the weight expanded as above, then ``input @ W.T + bias``."""
    from onnxscript import opset18 as op

    out = op.MatMul(input, op.Transpose(_expand_onnx(codebooks, codes), perm=[1, 0]))
    return out if bias is None else op.Add(out, bias)


def _embedding_onnx(indices, codebooks, codes, padding_idx=None, scale_grad_by_freq: bool = False):
    """ONNX for ``rpq_fx::embedding``: only the looked-up rows are expanded (two Gathers)."""
    from onnxscript import opset18 as op

    table, index = _table_and_index(codebooks, codes)
    rows = op.Gather(index, indices, axis=0)  # [..., C]
    values = op.Gather(table, rows, axis=0)  # [..., C, d]
    width = op.Constant(value_ints=[int(codes.shape[0]) * int(codebooks.shape[2])])
    return op.Reshape(values, op.Concat(op.Shape(indices), width, axis=0))


def _conv_onnx(input, codebooks, codes, bias, weight_shape, stride, padding, dilation, groups):
    """ONNX for ``rpq_fx::conv``: the weight expanded as above, viewed to its shape, then ``Conv``."""
    from onnxscript import opset18 as op

    weight = op.Reshape(_expand_onnx(codebooks, codes), op.Constant(value_ints=[int(s) for s in weight_shape]))
    options = dict(strides=list(stride), pads=[*padding, *padding], dilations=list(dilation), group=groups)
    return op.Conv(input, weight, **options) if bias is None else op.Conv(input, weight, bias, **options)


_TRANSLATIONS = {"expand": _expand_onnx, "linear": _linear_onnx, "embedding": _embedding_onnx, "conv": _conv_onnx}


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` of a converted model:
    every ``rpq_fx`` op this rpq_fx has (``expand``, and the compressed-domain ``linear`` and
    ``embedding`` where they exist)."""
    return {getattr(torch.ops.rpq_fx, name).default: fn for name, fn in _TRANSLATIONS.items()
            if hasattr(torch.ops.rpq_fx, name)}


def keep_expansions(node) -> bool | None:
    """``should_fold`` for onnxscript's optimizer: never fold what an rpq_fx op became into a dense constant."""
    props = node.metadata_props
    if any("rpq_fx." in props.get(key, "") for key in ("namespace", "pkg.torch.onnx.fx_node")):
        return False
    return None


def export_onnx(model: nn.Module, args: tuple, path: str | os.PathLike, *, kwargs: dict[str, Any] | None = None,
                dynamic_shapes: Any = None, opset_version: int | None = None) -> Path:
    """Export the converted ``model`` called on ``args`` to the ONNX file ``path``; returns the path.

    Call ``model.eval()`` first for inference. ``dynamic_shapes`` is passed to ``torch.export``
    (e.g. ``({0: torch.export.Dim("batch")},)`` for a dynamic batch). The graph is optimised
    (constant folding, CSE) except that no expansion is folded, so the file stays compressed.
    """
    _require()
    from onnxscript.optimizer import optimize_ir

    if not isinstance(args, tuple):
        args = (args,)
    program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                                custom_translation_table=onnx_translation_table())
    optimize_ir(program.model, should_fold=keep_expansions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return path
