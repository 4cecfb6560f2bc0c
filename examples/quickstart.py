"""The main job on built-in examples: convert timm's resnet18 and vit_tiny, check, report, export.

    python examples/quickstart.py [--out rpq_fx_out]
"""

import argparse
import copy

import timm
import torch

import rpq_fx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="rpq_fx_out", help="folder for the exported graphs (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for name in ("resnet18", "vit_tiny_patch16_224"):
        model = timm.create_model(name, pretrained=False).eval()
        converted = rpq_fx.RPQ(model)
        reference = copy.deepcopy(model)
        reference.load_state_dict(rpq_fx.decompress(converted), strict=False)
        with torch.no_grad():
            error = (converted(x) - reference(x)).abs().max().item()
        out = rpq_fx.export_graph(converted, f"{args.out}/{name}")
        print(f"\n=== {name}: {rpq_fx.model_size(model):.3f} MiB dense -> "
              f"{rpq_fx.model_size(converted):.3f} MiB RPQ ===")
        print(rpq_fx.report(converted))
        print(f"max |converted - dense reference| = {error:.2e}; graph written to {out}/")


if __name__ == "__main__":
    main()
