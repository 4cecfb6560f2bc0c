"""rpq_fx: Reverse Product Quantization as a torch.fx model-rewriting pass.

``net = rpq_fx.RPQ(net)`` stores every linear / conv / embedding weight as small learnable
codebooks plus uint8 codes, expanded just in time inside the forward pass. ``init="kmeans"``
(with ``calibration=`` inputs) fits them to a trained model instead; :func:`finetune` distils.
"""

from . import distributed, nn, ops
from .allocate import SizeCosts, allocate, size_costs
from .config import LayerSettings, RPQConfig
from .convert import RPQ, convert, rpq
from .decompress import decompress
from .errors import RPQConversionError
from .export import export_graph
from .finetune import finetune, float32_codebooks, param_groups
from .graph_module import RPQGraphModule
from .integrations import register as _register_integrations
from .io import RPQCheckpointError, checkpoint_info, checkpoint_report, load, save, save_dense
from .loss import distillation_loss
from .onnx_export import export_onnx
from .ops import compute_path
from .passes import register_layer
from .record import ConversionRecord, conversion_record
from .report import Report, model_size, report
from .stream import convert_checkpoint

__all__ = ["convert", "RPQ", "rpq", "allocate", "size_costs", "SizeCosts", "RPQGraphModule", "RPQConfig", "LayerSettings",
           "RPQConversionError", "decompress", "model_size", "report", "Report", "export_graph", "nn", "ops", "save",
           "load", "save_dense", "checkpoint_info", "checkpoint_report", "RPQCheckpointError", "export_onnx",
           "finetune", "param_groups", "float32_codebooks", "distillation_loss", "register_layer",
           "conversion_record", "ConversionRecord", "compute_path", "distributed", "RPQHfConfig", "convert_checkpoint"]
__version__ = "0.1.0"

_register_integrations()  # transformers' "rpq" quantization method, where transformers is installed


def __getattr__(name: str):
    if name == "RPQHfConfig":  # reason: needs transformers, imported only where it is installed and asked for
        from ._optional import require
        require("transformers", "hf", "rpq_fx.RPQHfConfig")
        from .integrations.transformers import RPQHfConfig
        return RPQHfConfig
    raise AttributeError(f"module 'rpq_fx' has no attribute {name!r}")
