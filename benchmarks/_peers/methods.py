"""The peers: each quantizer a user could pick instead of rpq_fx, at the settings its docs recommend.

A peer is a function ``(model, task) -> model`` that quantizes the task's selected weights of
``model`` (a private copy of the dense model) and returns the model to evaluate. Each is applied
only to ``task.weights`` (``benchmarks/_quality/tasks.py``'s selection) and to the layer types the
library handles; what it leaves dense counts as dense in the stored bits. A peer that cannot run
raises, and the benchmark records the error as its row.
"""

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# reason: llmcompressor 0.14 pins transformers<=5.17 and torch==2.14.0; installing it would downgrade
# the transformers 5.25 / torch 2.14.1 that rpq_fx and every other benchmark here run on
LLMCOMPRESSOR_PINS = ("llmcompressor 0.14.0.1 not installed: it requires transformers<=5.17.0,>=5.15.0 and "
                      "torch==2.14.0 (pip --dry-run), this environment has transformers 5.25 / torch 2.14.1")
# torchao's prototype k-means codebook fit, timed here on one Linear(1024, 512) (2 loaded cores)
CODEBOOK_SECONDS_PER_MWEIGHT = {(1, 1): 78.0, (1, 4): 110.0}
CODEBOOK_MAX_WEIGHTS = 2_000_000  # larger selections would take more than this run's budget (MiniLM: 10.6 M)


# torchao's Int8 / Intx weight-only configs also quantize nn.Embedding (its documented embedding path)
EMBEDDING_TOO = (nn.Linear, nn.Embedding)


@dataclass(frozen=True)
class Peer:
    method: str  # the library's own name for it
    library: str  # the distribution whose version is reported
    setting: str
    run: Callable[[nn.Module, object], nn.Module]
    data_aware: bool = False

    @property
    def version(self) -> str:
        try:
            return importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"


def _selected(task, types=(nn.Linear,)) -> Callable[[nn.Module, str], bool]:
    """torchao's ``filter_fn``: the task's selected weights, in layers of ``types``."""
    names = {n.rpartition(".")[0] for n in task.weights}
    return lambda module, fqn: isinstance(module, types) and fqn in names


def _torchao(make_config: Callable, types=(nn.Linear,)) -> Callable:
    def run(model, task):
        from torchao.quantization import quantize_

        quantize_(model, make_config(), filter_fn=_selected(task, types))
        return model
    return run


def _int8():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def _intx(bits: int, group: int):
    def make():
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group))
    return make


def _int4_tile(group: int):
    def make():
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=group)
    return make


def _codebook(dtype: str, block: tuple[int, int]) -> Callable:
    def run(model, task):
        from torchao.prototype.quantization.codebook import codebook_weight_only
        from torchao.quantization import quantize_

        pick = _selected(task)
        n = sum(m.weight.numel() for fqn, m in model.named_modules() if pick(m, fqn))
        if n > CODEBOOK_MAX_WEIGHTS:
            minutes = n / 1e6 * CODEBOOK_SECONDS_PER_MWEIGHT[block] / 60
            raise RuntimeError(f"not run: its k-means fit took {CODEBOOK_SECONDS_PER_MWEIGHT[block]:.0f} s per "
                               f"million weights here, ~{minutes:.0f} min for these {n / 1e6:.1f} M")
        quantize_(model, codebook_weight_only(dtype=getattr(torch, dtype), block_size=block), filter_fn=pick)
        return model
    return run


def _lut(bits: int):
    def make():
        from torchao.prototype.quantization.codebook_groupwise.api import GroupwiseLutWeightConfig
        return GroupwiseLutWeightConfig(code_dtype=getattr(torch, f"uint{bits}"), lut_block_shape=[1, -1])
    return make


def _torchao_gptq(base: Callable) -> Callable:
    """torchao's GPTQ: observe the calibration inputs, then convert (its documented two steps)."""
    def run(model, task):
        from torchao.prototype.gptq import GPTQConfig
        from torchao.quantization import quantize_

        quantize_(model, GPTQConfig(step="observe", base_config=base()), filter_fn=_selected(task))
        with torch.inference_mode():
            for item in task.calibration:
                model(**item) if isinstance(item, dict) else model(item)
        quantize_(model, GPTQConfig(step="convert", base_config=base()), filter_fn=_selected(task))
        return model
    return run


class NoGrad(nn.Module):
    """Runs ``wrapped`` under ``torch.no_grad`` even inside ``torch.inference_mode``.

    reason: optimum-quanto 0.2.7's qint4 / qint2 matmul raises "Cannot set version_counter for
    inference tensor" under ``torch.inference_mode`` (the tasks evaluate under it); its documented
    inference runs under ``no_grad``, which works."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.wrapped(*args, **kwargs)


def _quanto(qtype: str) -> Callable:
    def run(model, task):
        import optimum.quanto as quanto

        layers = [n.rpartition(".")[0] for n in task.weights]
        quanto.quantize(model, weights=getattr(quanto, qtype), include=layers)
        quanto.freeze(model)
        return NoGrad(model)
    return run


def _hqq(bits: int, group: int = 64) -> Callable:
    def run(model, task):
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=bits, group_size=group)
        for name in task.weights:
            path, _, _ = name.rpartition(".")
            layer = model.get_submodule(path)
            if isinstance(layer, nn.Linear):  # HQQLinear is its only layer type
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        HQQLinear(layer, config, compute_dtype=torch.float32, device="cpu"))
        return model
    return run


def _gptqmodel(bits: int) -> Callable:
    def run(model, task):
        from gptqmodel import GPTQModel, QuantizeConfig

        path = getattr(getattr(model, "config", None), "_name_or_path", None)
        if task.name != "minilm" or not path:
            raise RuntimeError("not applicable: GPTQModel.load takes a Hugging Face checkpoint (a causal LM); "
                               "this task's model is not one")
        quantized = GPTQModel.load(path, QuantizeConfig(bits=bits, group_size=128), device="cpu")
        quantized.quantize(task.calibration)
        return quantized.model
    return run


def _not_installed(message: str) -> Callable:
    def run(model, task):
        raise RuntimeError(message)
    return run


PEERS = [
    Peer("Int8WeightOnlyConfig", "torchao", "int8, per row", _torchao(_int8, EMBEDDING_TOO)),
    Peer("IntxWeightOnlyConfig", "torchao", "int4, group 32", _torchao(_intx(4, 32), EMBEDDING_TOO)),
    Peer("IntxWeightOnlyConfig", "torchao", "int4, group 128", _torchao(_intx(4, 128), EMBEDDING_TOO)),
    Peer("IntxWeightOnlyConfig", "torchao", "int2, group 32", _torchao(_intx(2, 32), EMBEDDING_TOO)),
    Peer("IntxWeightOnlyConfig", "torchao", "int2, group 128", _torchao(_intx(2, 128), EMBEDDING_TOO)),
    Peer("Int4WeightOnlyConfig", "torchao", "int4, group 128", _torchao(_int4_tile(128))),
    Peer("codebook_weight_only (prototype)", "torchao", "uint4 codes, scalar (block 1x1)", _codebook("uint4", (1, 1))),
    Peer("codebook_weight_only (prototype)", "torchao", "uint8 codes, 4-vectors (block 1x4)",
         _codebook("uint8", (1, 4))),
    Peer("GroupwiseLutWeightConfig (prototype)", "torchao", "uint4 LUT per row", _torchao(_lut(4))),
    Peer("GroupwiseLutWeightConfig (prototype)", "torchao", "uint2 LUT per row", _torchao(_lut(2))),
    Peer("GPTQConfig (prototype)", "torchao", "int8 base", _torchao_gptq(_int8), data_aware=True),
    Peer("GPTQConfig (prototype)", "torchao", "int4 base, group 128", _torchao_gptq(_int4_tile(128)),
         data_aware=True),
    Peer("quantize(weights=qint8)", "optimum-quanto", "qint8", _quanto("qint8")),
    Peer("quantize(weights=qint4)", "optimum-quanto", "qint4 (group 128)", _quanto("qint4")),
    Peer("quantize(weights=qint2)", "optimum-quanto", "qint2 (group 128)", _quanto("qint2")),
    Peer("HQQLinear", "hqq", "4 bits, group 64", _hqq(4)),
    Peer("HQQLinear", "hqq", "3 bits, group 64", _hqq(3)),
    Peer("HQQLinear", "hqq", "2 bits, group 64", _hqq(2)),
    Peer("GPTQModel", "gptqmodel", "4 bits, group 128", _gptqmodel(4), data_aware=True),
    Peer("GPTQModel", "gptqmodel", "2 bits, group 128", _gptqmodel(2), data_aware=True),
    Peer("oneshot(GPTQModifier)", "llmcompressor", "W4A16 / W2A16", _not_installed(LLMCOMPRESSOR_PINS),
         data_aware=True),
]
