"""The core install (torch, safetensors, tabulate, tqdm) converts, saves, loads, reports and fine-tunes;
every other library is an extra, imported only where used, and a missing one names its extra."""

import importlib.metadata
import subprocess
import sys

import pytest

from rpq_fx._optional import require

OPTIONAL = ("timm", "pydot", "transformers", "onnx", "onnxscript", "onnx_ir", "onnxruntime")

_WITHOUT_OPTIONAL = f"""
import sys, tempfile
sys.modules.update(dict.fromkeys({OPTIONAL!r}))  # None there: importing them raises ModuleNotFoundError
import torch, rpq_fx, rpq_fx._optional
from torch import nn
model = nn.Sequential(nn.Embedding(300, 16), nn.Linear(16, 300))
gm = rpq_fx.convert(model, codebook_dim=4, num_codes=16, init="kmeans", calibration=[torch.arange(8)],
                    progress=False)
rpq_fx.report(gm), rpq_fx.decompress(gm)
path = rpq_fx.save(gm, tempfile.mkdtemp() + "/m.safetensors")
rpq_fx.load(nn.Sequential(nn.Embedding(300, 16), nn.Linear(16, 300)), path)
rpq_fx.finetune(gm, model, [torch.arange(8)], steps=1, progress=False)
try:
    rpq_fx._optional.require("timm", "timm", "a timm model")
except ImportError as error:
    print(error)
print(sorted(name for name in {OPTIONAL!r} if sys.modules.get(name) is not None))
"""


def test_core_dependencies_are_torch_safetensors_tabulate_and_tqdm():
    core = [r for r in importlib.metadata.requires("rpq_fx") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0] for r in core) == ["safetensors", "tabulate", "torch", "tqdm"]


def test_the_core_works_without_any_optional_library():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_OPTIONAL], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    message, imported = result.stdout.strip().splitlines()[-2:]
    assert message.startswith("a timm model needs timm") and "pip install 'rpq_fx[timm]'" in message
    assert imported == "[]"


def test_require_imports_or_names_the_extra():
    assert require("json", "none", "this test").dumps([1]) == "[1]"
    with pytest.raises(ImportError, match=r"export_graph needs no_such_module_rpq .*pip install 'rpq_fx\[graph\]'"):
        require("no_such_module_rpq", "graph", "export_graph")
