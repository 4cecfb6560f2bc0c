"""rpq_fx on a GPU (issue 24): the Triton kernels against cuBLAS, one layer and whole models.

1. Linear layers, per batch (1, 4, 16, 64, 256, 1024) and dtype (float16, bfloat16): cuBLAS
   ``F.linear`` on the dense weight against ``rpq_fx::linear`` forced ``compressed`` (Triton lookup
   tables / fused GEMM: W never written), forced ``expand`` (Triton expansion, then cuBLAS) and
   ``auto`` (the per-call choice, named beside it), forward and forward+backward (input and
   codebook gradients). Two layers: ``RPQLinear(4096, 4096, num_codebooks=16)`` (d = 256) and the
   fitted settings (one shared codebook, d = 4, K = 256, about 2 bits). At batch 1 the forward is
   also timed replayed from a CUDA graph (launch overhead removed).
2. Expansion against ``W.clone()``: the rate of bytes moved (read + written), and its share of the copy's.
3. Whole models, random init, bfloat16 autocast: timm ViT-B/16 (``num_codebooks=12``) and a
   Llama-architecture decoder of 1.1B parameters (TinyLlama's shape, ``num_codebooks=16``),
   dense against converted: inference latency and one AdamW training step, with peak GPU memory.

Times are medians of ``triton.testing.do_bench`` (CUDA events; L2 flushed between calls). Needs a
CUDA GPU: without one it says so and exits with status 1, writing nothing. Prints the card, writes
``benchmarks/results/gpu.md``. Sized to finish in under 8 minutes on an H100 (not yet run on any
GPU: no figure here is measured until its table is committed).

    python benchmarks/gpu.py [--quick] [--skip-models] [--out benchmarks/results/gpu.md]
"""

import argparse
import copy
import gc
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, load, table  # noqa: E402

BATCHES = (1, 4, 16, 64, 256, 1024)
DTYPES = (torch.float16, torch.bfloat16)
LAYERS = [  # label, in, out, num_codebooks, shared
    ("RPQ 4096x4096, C=16 (d=256)", 4096, 4096, 16, False),
    ("fitted 4096x4096, d=4 shared, K=256", 4096, 4096, 1024, True),
]
PATHS = ("compressed", "expand", "auto")
DEVICE = "cuda"


def _bench(fn, grads=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, grad_to_none=grads, return_mode="median")


def _graph_ms(fn) -> float | str:
    """``fn`` replayed from a CUDA graph, or why it could not be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=40, return_mode="median")
    except Exception as error:  # reason: a capture can fail (a host sync in the op): report it, keep going
        return f"no graph: {type(error).__name__}"


def linear_rows(quick: bool) -> list[list]:
    from rpq_fx.nn import RPQLinear
    from rpq_fx.ops import choose_path, expand, linear

    rows = []
    for label, fin, fout, num_codebooks, shared in LAYERS:
        for dtype in DTYPES:
            torch.manual_seed(0)
            layer = RPQLinear(fin, fout, num_codebooks, shared_codebooks=shared, device=DEVICE, dtype=dtype)
            cb, codes, bias = layer.weight.codebooks, layer.weight.codes, layer.bias
            weight = expand(cb, codes).detach().requires_grad_()
            dense_bias = bias.detach().clone().requires_grad_()
            for batch in (BATCHES[:3] if quick else BATCHES):
                x = torch.randn(batch, fin, device=DEVICE, dtype=dtype, requires_grad=True)
                grad = torch.randn(batch, fout, device=DEVICE, dtype=dtype)
                calls = {"cuBLAS": lambda x: F.linear(x, weight, dense_bias),
                         **{p: (lambda x, p=p: linear(x, cb, codes, bias, p)) for p in PATHS}}
                fwd, step = {}, {}
                for name, fn in calls.items():
                    with torch.no_grad():
                        fwd[name] = _bench(lambda fn=fn: fn(x))
                    step[name] = _bench(lambda fn=fn: fn(x).backward(grad), grads=[x, cb, bias, weight, dense_bias])
                choice = f"{choose_path(x, cb, codes)} / {choose_path(x, cb, codes, backward=True)}"
                graph = ""
                if batch == 1:
                    with torch.no_grad():
                        dense_g, rpq_g = (_graph_ms(lambda: calls["cuBLAS"](x)),
                                          _graph_ms(lambda: calls["compressed"](x)))
                    graph = (f"{dense_g:.4f} / {rpq_g:.4f} ({dense_g / rpq_g:.2f}x)"
                             if isinstance(dense_g, float) and isinstance(rpq_g, float) else f"{dense_g} / {rpq_g}")
                for mode, times in (("forward", fwd), ("forward+backward", step)):
                    best = min(times[p] for p in PATHS[:2])
                    rows.append([label, str(dtype).removeprefix("torch."), batch, mode, times["cuBLAS"],
                                 times["compressed"], times["expand"], times["auto"], choice,
                                 times["cuBLAS"] / times["auto"], times["auto"] / best,
                                 graph if mode == "forward" else ""])
                print(*rows[-2], sep=" | ", flush=True)
                print(*rows[-1], sep=" | ", flush=True)
            del layer, weight
    return rows


def expansion_rows() -> list[list]:
    from rpq_fx.nn import RPQLinear
    from rpq_fx.ops import expand

    rows = []
    for fin, fout, num_codebooks in ((4096, 4096, 16), (8192, 8192, 32), (4096, 4096, 1024)):
        layer = RPQLinear(fin, fout, num_codebooks, device=DEVICE, dtype=torch.float16)
        cb, codes = layer.weight.codebooks.detach(), layer.weight.codes
        weight = expand(cb, codes)
        with torch.no_grad():
            t_expand = _bench(lambda: expand(cb, codes))
            t_clone = _bench(lambda: weight.clone())
        moved_expand = weight.nbytes + codes.nbytes + cb.nbytes  # written + read
        moved_clone = 2 * weight.nbytes
        rate_expand, rate_clone = moved_expand / t_expand / 1e6, moved_clone / t_clone / 1e6  # GB/s
        rows.append([f"{fout}x{fin}, C={num_codebooks} (d={fin // num_codebooks}), float16", t_expand, t_clone,
                     rate_expand, rate_clone, rate_expand / rate_clone])
        print(*rows[-1], sep=" | ", flush=True)
        del layer, weight
    return rows


def _vit():
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False), 12, lambda b: (torch.randn(b, 3, 224, 224),)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000)
    return LlamaForCausalLM(config), 16, lambda b: (torch.randint(0, 32000, (1, b)),)


MODELS = [  # label, builder, inference batches (images / tokens), training batch
    ("ViT-B/16", _vit, (1, 64), 32),
    ("Llama 1.1B", _llama, (1, 512), 512),
]


def _loss(model, inputs):
    out = model(*inputs)
    if hasattr(out, "logits"):
        return out.logits.float().square().mean()
    return F.cross_entropy(out.float(), torch.zeros(out.shape[0], dtype=torch.long, device=out.device))


def model_rows(quick: bool) -> list[list]:
    import rpq_fx

    rows = []
    for label, build, batches, train_batch in MODELS:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            dense, num_codebooks, make = build()
        converted = rpq_fx.convert(copy.deepcopy(dense).cpu(), num_codebooks=num_codebooks, inplace=True,
                                   progress=False)
        variants = [("dense", dense), ("rpq_fx", converted)]
        del dense, converted  # reason: each model leaves the GPU before the next is measured (peak memory)
        while variants:
            variant, model = variants.pop(0)
            model = model.to(DEVICE)
            params = sum(p.numel() for p in model.parameters())
            mib = rpq_fx.model_size(model)
            for batch in batches[:1] if quick else batches:
                inputs = [t.to(DEVICE) for t in make(batch)]
                model.eval()
                with torch.inference_mode(), torch.autocast(DEVICE, torch.bfloat16):
                    ms = _bench(lambda: model(*inputs))
                rows.append([label, variant, f"inference, batch {batch}", ms, "", f"{mib:.0f}", params])
                print(*rows[-1], sep=" | ", flush=True)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            inputs = [t.to(DEVICE) for t in make(train_batch)]

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(DEVICE, torch.bfloat16):
                    loss = _loss(model, inputs)
                loss.backward()
                opt.step()

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = _bench(step)
            peak = torch.cuda.max_memory_allocated() / 2**20
            rows.append([label, variant, f"train step (AdamW), batch {train_batch}", ms, f"{peak:.0f}",
                         f"{mib:.0f}", params])
            print(*rows[-1], sep=" | ", flush=True)
            del opt, model, inputs, step
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _section(name: str, fn, *args) -> tuple[list[list], str]:
    """The rows of one section, or none and the error (the other sections still run)."""
    try:
        return fn(*args), ""
    except Exception:  # reason: one GPU call runs all sections; a failing one is reported, not fatal
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        return [], f"\n{name} failed:\n\n```\n{error.strip()[-2000:]}\n```\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches 1, 4, 16 and one inference batch per model")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was timed or written")
    from rpq_fx import _triton

    started, start = load(), time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    card = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}), "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}; compute on CUDA: {_triton.status()}")
    print(f"card: {card}", flush=True)
    linear, linear_error = _section("linear", linear_rows, args.quick)
    expansion, expansion_error = _section("expansion", expansion_rows)
    models, models_error = ([], "") if args.skip_models else _section("models", model_rows, args.quick)
    body = [
        f"# rpq_fx on a GPU\n\nCommand: `{command()}`.\nCard: {card}.\nLoad average when it started: {started}; "
        f"when it ended: {load()}; {time.perf_counter() - start:.0f} s in all.\n",
        "## Linear layers (ms; medians of triton.testing.do_bench)\n\n`auto` picks per call (forward / backward "
        "named under `choice`); `dense/auto` above 1 is faster than cuBLAS; `auto/best` is 1.00 where the choice "
        "was the faster path. At batch 1, `CUDA graph` is cuBLAS / compressed replayed from a graph.\n",
        table(linear, ["layer", "dtype", "batch", "mode", "cuBLAS", "compressed", "expand", "auto", "choice",
                       "dense/auto", "auto/best", "CUDA graph"], floatfmt=".4f") + linear_error,
        "\n## Expansion against W.clone()\n\nRates are bytes moved (read + written) per second.\n",
        table(expansion, ["weight", "expand ms", "clone ms", "expand GB/s", "clone GB/s", "share of copy rate"],
              floatfmt=".3f") + expansion_error,
    ]
    if not args.skip_models:
        body += ["\n## Whole models (random init, bfloat16 autocast)\n",
                 table(models, ["model", "variant", "task", "ms", "peak MiB", "model MiB", "parameters"],
                       floatfmt=".2f") + models_error]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(body).rstrip() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
