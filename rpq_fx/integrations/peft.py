"""PEFT LoRA on converted models: adapters on ``rpq_fx.nn.RPQLinear`` layers, the RPQ weights frozen.

Through PEFT's custom-module support (``LoraConfig._register_custom_module``, PEFT's "custom models"
guide): :func:`register` maps ``RPQLinear`` to :class:`RPQLoraLinear` on a ``LoraConfig``, so that
``peft.get_peft_model`` with ``target_modules`` naming converted linear layers wraps them::

    from peft import LoraConfig, get_peft_model
    from rpq_fx.integrations.peft import from_pretrained, register

    model = rpq_fx.convert(model, codebook_dim=16, capture="module")     # real RPQLinear layers
    peft_model = get_peft_model(model, register(LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    ...                                                                    # train: only lora_A / lora_B learn
    peft_model.save_pretrained(folder)                                     # the adapter alone
    peft_model = from_pretrained(converted_model, folder)                  # PeftModel.from_pretrained, registered

The mapping is not saved with the adapter (PEFT keeps it out of ``adapter_config.json``):
:func:`from_pretrained` registers it again before loading.

Merging is refused: a LoRA update ``B A`` is dense and the RPQ weight is codebooks and codes, so
``merge()`` / ``merge_and_unload()`` raise :class:`RPQMergeError`. ``unload()`` (no merge) gives back
the ``RPQLinear`` layers; the adapters stay unmerged and are applied beside the RPQ weight.
"""

from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..nn import RPQLinear

__all__ = ["RPQLoraLinear", "RPQMergeError", "register", "from_pretrained"]


class RPQMergeError(ValueError):
    """A LoRA adapter cannot be merged into an RPQ weight."""


class RPQLoraLinear(nn.Module, LoraLayer):
    """LoRA beside an ``RPQLinear``: ``base(x) + scaling * lora_B(lora_A(dropout(x)))``, never merged."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any):
        for option in ("use_dora", "velora_config", "lora_bias"):
            if getattr(config, option, None):
                raise ValueError(f"RPQLoraLinear: LoRA option {option}={getattr(config, option)!r} is not supported on "
                                 "RPQ layers (it reads or changes the dense weight); plain LoRA is")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # reason: PEFT's own lookup knows its built-in layer types only and warns about any other
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            # reason: under autocast the adapter's linears cast for themselves; otherwise x meets the adapter's dtype
            cast = not torch.is_autocast_enabled(x.device.type)
            h = self._cast_input_dtype(x, lora_A.weight.dtype) if cast else x
            update = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + (update.to(result.dtype) if cast else update)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise RPQMergeError(
            f"cannot merge LoRA adapter(s) {adapter_names or self.active_adapters} into an RPQ weight (codebooks and "
            "codes; the update B@A is dense). Keep the adapter unmerged: save it with save_pretrained and load it "
            "with rpq_fx.integrations.peft.from_pretrained, or unload() to drop it")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """``config`` with ``RPQLinear`` mapped to :class:`RPQLoraLinear` (PEFT's custom-module support); returned."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"rpq_fx.integrations.peft.register: expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({RPQLinear: RPQLoraLinear})
    return config


def from_pretrained(model: nn.Module, folder, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, folder, ...)`` of an adapter saved from a converted model, the
    ``RPQLinear`` mapping registered again first (``adapter_config.json`` does not keep it)."""
    config = kwargs.pop("config", None) or LoraConfig.from_pretrained(folder)
    return PeftModel.from_pretrained(model, folder, config=register(config), **kwargs)
