"""Convert a Llama-architecture checkpoint bigger than the memory it is converted in (issue 22).

Writes a sharded safetensors checkpoint of random weights (one shard per two blocks, and
``model.safetensors.index.json``), converts it with :func:`rpq_fx.stream.convert_checkpoint` in a
subprocess that builds the model on the meta device, and records that process's peak resident memory
(``VmHWM``), wall and CPU time and throughput; then loads the result on the meta device in another
subprocess and runs it. The checkpoint is deleted after. ``--calibration N`` makes the fit data-aware
(block by block); ``--trace FILE`` appends a line per block fitted (resident memory, CPU and wall time)
to FILE as the run goes. Results: ``benchmarks/results/big_checkpoint.md``.

    python benchmarks/big_checkpoint.py --layers 20 --hidden 2048 --intermediate 5632 --init kmeans
    python benchmarks/big_checkpoint.py --layers 4 --hidden 1024 --intermediate 2816 --init kmeans --calibration 4
    OMP_NUM_THREADS=1 python benchmarks/big_checkpoint.py --layers 360 --hidden 512 --intermediate 1408 --vocab 8192 \
        --calibration 4 --tokens 64 --no-error-feedback --trace block.log   # data-aware, 4.34 GiB under 1.24 GiB
"""

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = dict(codebook_dim=16, num_codes=16, shared_codebooks=True)  # cheap k-means: the memory is measured here


def config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, tie_word_embeddings=False)


def meta_model(args):
    import accelerate
    from transformers import LlamaForCausalLM

    with accelerate.init_empty_weights():  # parameters on meta, the rotary frequencies computed
        return LlamaForCausalLM(config(args)).eval()


def peak() -> int:
    """This process's peak resident memory, bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))


def resident() -> int:
    """This process's resident memory now, bytes."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))


class _Trace(logging.Handler):
    """Appends each of ``rpq_fx.fit.sequential``'s per-block lines to a file, with the process's
    resident and peak memory and its CPU and wall time since ``start``."""

    def __init__(self, path: str, start: tuple[float, float]):
        super().__init__(logging.INFO)
        self.path, self.start = path, start

    def emit(self, record):
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        with open(self.path, "a") as f:
            f.write(f"{record.getMessage()}  rss {resident() / 2**20:.0f} MiB  peak {peak() / 2**20:.0f} MiB  "
                    f"wall {wall:.0f} s  cpu {cpu:.0f} s\n")


def write_checkpoint(args, folder: Path) -> tuple[int, int]:
    """Random weights (N(0, 0.02), norms 1), one shard per two blocks; returns (bytes, parameters)."""
    from safetensors.torch import save_file

    shapes = {name: tuple(p.shape) for name, p in meta_model(args).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        block = name.split(".")[2] if name.startswith("model.layers.") else None
        groups.setdefault("rest" if block is None else str(int(block) // 2), []).append(name)
    weight_map, total, params = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for i, (key, names) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.ones(shapes[name]) if "norm" in name else
                   torch.randn(shapes[name], generator=generator).mul_(0.02) for name in names}
        save_file(tensors, folder / file)
        weight_map.update(dict.fromkeys(names, file))
        params += sum(t.numel() for t in tensors.values())
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total, params


def calibration(args) -> list:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, args.vocab, (1, args.tokens), generator=generator)}
            for _ in range(args.calibration)]


def convert_step(args) -> dict:
    from rpq_fx.stream import convert_checkpoint

    model = meta_model(args)
    extra = {"calibration": calibration(args)} if args.calibration else {}
    if args.no_error_feedback:
        extra["error_feedback"] = False
    wall, cpu = time.perf_counter(), time.process_time()
    if args.trace:
        log = logging.getLogger("rpq_fx.fit.sequential")
        log.setLevel(logging.INFO)
        log.addHandler(_Trace(args.trace, (wall, cpu)))
    out = convert_checkpoint(model, args.checkpoint, args.out, init=args.init, progress=False, **SETTINGS, **extra)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "peak": peak(),
            "out_bytes": out.stat().st_size}


def load_step(args) -> dict:
    import rpq_fx

    model = rpq_fx.load(meta_model(args), args.out)
    with torch.no_grad():
        logits = model(torch.randint(0, args.vocab, (1, 16))).logits
    return {"runs": bool(torch.isfinite(logits).all()) and list(logits.shape) == [1, 16, args.vocab], "peak": peak()}


def child(args, step: str) -> dict:
    command = [sys.executable, __file__, "--step", step, *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{step} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--init", default="kmeans", choices=["random", "kmeans"])
    parser.add_argument("--calibration", type=int, default=0, help="calibration items (0: a plain k-means fit)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per calibration item")
    parser.add_argument("--no-error-feedback", action="store_true",
                        help="error_feedback=False: each slice quantised under H's diagonal (about 3x less CPU)")
    parser.add_argument("--trace", help="a file to append a line to per block fitted (memory, CPU, wall time)")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the checkpoint (a temporary folder)")
    parser.add_argument("--step", choices=["convert", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps((convert_step if args.step == "convert" else load_step)(args)))
        return
    folder = Path(tempfile.mkdtemp(prefix="rpq_big_", dir=args.folder))
    load_before = os.getloadavg()[0]
    try:
        start = time.perf_counter()
        size, params = write_checkpoint(args, folder)
        written = time.perf_counter() - start
        sys.argv += ["--checkpoint", str(folder), "--out", str(folder / "rpq.safetensors")]
        converted = child(args, "convert")
        loaded = child(args, "load")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    gib = 2**30
    row = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
           "init": args.init + (f"+calibration ({args.calibration}x{args.tokens} tokens)" if args.calibration else "")
           + (", error_feedback=False" if args.no_error_feedback else ""),
           "checkpoint_GiB": round(size / gib, 3), "params_M": round(params / 1e6, 1),
           "peak_rss_GiB": round(converted["peak"] / gib, 3),
           "checkpoint_over_peak": round(size / converted["peak"], 2),
           "wall_s": round(converted["wall_s"], 1), "cpu_s": round(converted["cpu_s"], 1),
           "params_per_s_M": round(params / converted["wall_s"] / 1e6, 2),
           "out_MiB": round(converted["out_bytes"] / 2**20, 1),
           "loads_on_meta_and_runs": loaded["runs"], "load_peak_rss_GiB": round(loaded["peak"] / gib, 3),
           "write_s": round(written, 1), "load_avg": [round(load_before, 1), round(os.getloadavg()[0], 1)],
           "settings": SETTINGS}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
