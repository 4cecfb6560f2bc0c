"""Train a converted model sharded with FSDP2 (``fully_shard``), one process per CPU core (gloo):

    torchrun --nproc-per-node 2 examples/train_fsdp.py [--steps 30] [--out rpq_fsdp.safetensors] [--dcp rpq_fsdp_dcp]

Every rank converts the same model with the same seed, keeping its class and blocks (``capture="module"``),
then shards each block and the root: the codebooks are FSDP2's sharded parameters; the codes are buffers,
which FSDP2 leaves as each rank made them, so they are checked to agree (``broadcast_codes`` would copy rank
0's). Each rank trains on its share of scikit-learn's digits. At the end ``rpq_fx.save`` gathers the shards
into the one-file checkpoint (written by rank 0), and ``torch.distributed.checkpoint`` saves the sharded
state dict, which loads on any number of ranks, one included.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import rpq_fx
from rpq_fx.distributed import check_codes_in_sync


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, width: int = 256, depth: int = 2):
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def digits() -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--out", default="rpq_fsdp.safetensors", help="one-file checkpoint (default: %(default)s)")
    parser.add_argument("--dcp", default="rpq_fsdp_dcp", help="sharded DCP checkpoint folder (default: %(default)s)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = rpq_fx.RPQ(Net(), capture="module", progress=False)  # convert first, then shard
    check_codes_in_sync(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    data = digits()
    sampler = DistributedSampler(data, seed=0)
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            step += 1
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0 and (step % 10 == 0 or step == 1):
                print(f"step {step:3d}  loss {mean.item() / world:.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1
    rpq_fx.save(model, args.out)  # every rank calls it: the shards are gathered, rank 0 writes
    dcp.save(get_model_state_dict(model), checkpoint_id=args.dcp)  # each rank writes its shard
    if rank == 0:
        size = os.path.getsize(args.out) / 2**20
        print(f"{world} ranks, {args.steps} steps: wrote {args.out} ({size:.3f} MiB) and the sharded {args.dcp}/")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
