"""Train a converted model with DistributedDataParallel, one process per CPU core (gloo):

    torchrun --nproc-per-node 2 examples/train_ddp.py [--steps 30] [--out rpq_ddp.safetensors]

Every rank converts the same model with the same seed (the same codes and codebooks), then wraps it:
DDP broadcasts rank 0's parameters and buffers (the codes) once and averages the codebooks' gradients
on every step. Each rank trains on its share of scikit-learn's digits; rank 0 saves the result.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import rpq_fx
from rpq_fx.distributed import check_codes_in_sync


def digits() -> TensorDataset:
    x, y = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--out", default="rpq_ddp.safetensors", help="checkpoint rank 0 writes (default: %(default)s)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    dense = rpq_fx.model_size(model)
    model = rpq_fx.RPQ(model, progress=False)  # convert first, then wrap
    check_codes_in_sync(model)  # the same seed gave every rank the same codes
    ddp = DistributedDataParallel(model)
    data = digits()
    sampler = DistributedSampler(data, seed=0)  # each rank its share of every epoch
    loader = DataLoader(data, batch_size=64, sampler=sampler)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
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
    rpq_fx.save(ddp, args.out)  # every rank calls it; rank 0 writes the file
    if rank == 0:
        with torch.no_grad():
            accuracy = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
        print(f"{world} ranks, {args.steps} steps: accuracy {accuracy:.3f} on all {len(data)} digits; "
              f"{dense:.3f} MiB dense -> {rpq_fx.model_size(model):.3f} MiB RPQ, saved to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
