"""Tensors on different devices are refused by every op, as dense torch refuses them (issue 19 item 5).

A model converted on the meta device and called on a CPU input returned uninitialised CPU memory:
the mixed call dispatched to the fake kernel, which built its output like the (CPU) input.
"""

import pytest
import torch

import rpq_fx.ops as ops
from rpq_fx.nn import RPQEmbedding, RPQLinear

MESSAGE = "tensors on different devices"


def _tensors(device_of: dict) -> dict:
    """The arguments of every op, each on the device ``device_of`` names (default cpu)."""
    on = lambda name: device_of.get(name, "cpu")  # noqa: E731
    return dict(codebooks=torch.randn(3, 16, 4, device=on("codebooks")),
                codes=torch.zeros(3, 10, dtype=torch.uint8, device=on("codes")),
                input=torch.randn(2, 12, device=on("input")), grad=torch.randn(2, 10, device=on("grad")),
                grad_w=torch.randn(10, 12, device=on("grad")), bias=torch.randn(10, device=on("bias")),
                indices=torch.tensor([1, 2], device=on("indices")),
                hot_index=torch.tensor([0, 3, 4, 5, 6, 7, 8, 9, 10, 11], dtype=torch.int32, device=on("hot_index")))


CALLS = {
    "expand": (("codebooks", "codes"), lambda t: torch.ops.rpq_fx.expand(t["codebooks"], t["codes"])),
    "expand_backward": (("grad", "codes"), lambda t: torch.ops.rpq_fx.expand_backward(t["grad_w"], t["codes"], 3, 16)),
    "linear": (("input", "codebooks", "codes", "bias"),
               lambda t: torch.ops.rpq_fx.linear(t["input"], t["codebooks"], t["codes"], t["bias"])),
    "linear_backward": (("grad", "input", "codebooks", "codes"), lambda t: torch.ops.rpq_fx.linear_backward(
        t["grad"], t["input"], t["codebooks"], t["codes"], True, True)),
    "embedding": (("indices", "codebooks", "codes"),
                  lambda t: torch.ops.rpq_fx.embedding(t["indices"], t["codebooks"], t["codes"])),
    "hot_embedding": (("indices", "codebooks", "codes", "hot_index"), lambda t: ops.hot_embedding(
        t["indices"], t["codebooks"], t["codes"], t["hot_index"], 12)),
}
DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(op, name, device) for op, (names, _) in CALLS.items() for name in names for device in DEVICES]


@pytest.mark.parametrize("op,moved,device", CASES)
def test_every_op_refuses_one_tensor_on_another_device(op, moved, device):
    names, call = CALLS[op]
    with pytest.raises(RuntimeError, match=rf"rpq_fx {op}: {MESSAGE} \(.*{moved} on {device}"):
        call(_tensors({moved: device}))
    # and the same call all on one device runs (or, on meta, gives a meta result)
    out = call(_tensors({name: device for name in names} | ({"grad": device} if op == "expand_backward" else {})))
    assert all(t.device.type == device for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("path", ["compressed", "expand"])
def test_a_layer_built_on_meta_refuses_a_cpu_input(path):
    """The issue's case, through the layers: no uninitialised memory comes back."""
    layer = RPQLinear(64, 512, 4, device="meta")
    with pytest.raises(RuntimeError, match=f"rpq_fx linear: {MESSAGE} \\(input on cpu, codebooks on meta"):
        ops.linear(torch.randn(2, 64), layer.weight.codebooks, layer.weight.codes, layer.bias, path)
    with pytest.raises(RuntimeError, match=MESSAGE):
        layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match=MESSAGE):
        RPQEmbedding(1000, 64, 4, device="meta")(torch.tensor([1, 2]))
