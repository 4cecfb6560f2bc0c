"""OPT-66b's positional embedding (transformers' ``OPTLearnedPositionalEmbedding``, 2050 x 9216, an
``nn.Embedding`` subclass with its own forward) converted in place: one decode step's lookup (one position
after a 16-token context), with the table read as a ``LookupWeight`` (the looked-up row only) and, for
comparison, expanded whole as before (``--expand``). Prints the median wall and process-CPU time of a call.

    python benchmarks/opt_positions.py [--expand]
"""

import argparse
import sys
import time

import torch
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

import rpq_fx


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.positions = OPTLearnedPositionalEmbedding(2048, 9216)

    def forward(self, mask, past):
        if mask.sum() < 0:  # reason: untraceable whole, so it converts layer by layer as a Hugging Face model does
            return mask
        return self.positions(mask, past)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expand", action="store_true", help="expand the whole table per call (the old path)")
    args = parser.parse_args()
    if args.expand:  # reason: a benchmark's A/B switch, not an API: the rewrite then reads the table as before
        sys.modules["rpq_fx.passes.rewrite"].reads_rows = lambda module, name: False
    model = rpq_fx.convert(Holder(), num_codebooks=72, progress=False).eval()
    mask = torch.ones(1, 17, dtype=torch.long)
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(30):
            wall, cpu = time.perf_counter(), time.process_time()
            model(mask, 16)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    walls.sort(), cpus.sort()
    print(f"{'whole table expanded' if args.expand else 'LookupWeight'}: median {walls[15] * 1e3:.2f} ms wall, "
          f"{cpus[15] * 1e3:.2f} ms process CPU per call ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
