"""Save, load, export: timm resnet18 through rpq_fx.save / load / save_dense / export_onnx.

    python examples/ship_resnet18.py [--out rpq_fx_out/ship]

Prints the sizes (dense, model_size, checkpoint file, dense checkpoint, ONNX file), checks that the
model loaded onto a meta-built resnet18 is bit-identical, and the onnxruntime max abs difference.
"""

import argparse
import time

import onnxruntime as ort
import timm
import torch

import rpq_fx

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="rpq_fx_out/ship", help="folder for the files (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = timm.create_model("resnet18", pretrained=False).eval()
    model = rpq_fx.RPQ(dense).eval()
    x = torch.randn(2, 3, 224, 224)

    checkpoint = rpq_fx.save(model, f"{args.out}/resnet18.safetensors", spec="timm:resnet18")
    with torch.device("meta"):
        skeleton = timm.create_model("resnet18", pretrained=False).eval()
    start = time.perf_counter()
    loaded = rpq_fx.load(skeleton, checkpoint)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        identical = torch.equal(model(x), loaded(x))
    dense_file = rpq_fx.save_dense(model, f"{args.out}/resnet18_dense.safetensors")

    onnx_file = rpq_fx.export_onnx(model, (x,), f"{args.out}/resnet18.onnx",
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        reference = model(x)
    diff = (torch.from_numpy(y) - reference).abs().max().item()

    print(f"dense resnet18 parameters + buffers     {rpq_fx.model_size(dense):8.3f} MiB")
    print(f"rpq_fx.model_size(RPQ(resnet18))        {rpq_fx.model_size(model):8.3f} MiB")
    print(f"rpq_fx.save checkpoint                  {checkpoint.stat().st_size / MIB:8.3f} MiB  ({checkpoint})")
    print(f"rpq_fx.save_dense checkpoint            {dense_file.stat().st_size / MIB:8.3f} MiB  ({dense_file})")
    print(f"rpq_fx.export_onnx file                 {onnx_file.stat().st_size / MIB:8.3f} MiB  ({onnx_file})")
    print(f"load onto a meta-built resnet18: {load_s:.2f} s, outputs bit-identical: {identical}")
    print(f"onnxruntime vs PyTorch: max |diff| = {diff:.2e} (max |y| = {reference.abs().max().item():.3f})")


if __name__ == "__main__":
    main()
