"""torchrun worker of tests/test_distributed.py: ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT
[SCENARIO ...]`` runs each scenario on 2 gloo ranks and rank 0 writes ``OUT/results.json``.

A training scenario converts one model (the same seed on every rank), trains an unwrapped copy in one process on
the whole batch (the reference, run on every rank) and the wrapped model on each rank's half of it, the same
AdamW steps, and records how far apart their parameters end (gathered from the shards under FSDP2) against how far
training moved them. The other scenarios record the codes checks, rpq_fx.save of a sharded model, DCP and
rpq_fx.finetune. A scenario that raises on every rank records its error instead. "compile fsdp root" (torch.compile
of the whole FSDP2 model, 3x the compile time of compiling per block) is left out of the test; run it by name.
The compile scenarios use the aot_eager backend (dynamo and AOT autograd, no code generation: seconds, not
minutes); ``RPQ_FX_COMPILE_BACKEND=inductor`` runs them with the default backend.
"""

import copy
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import rpq_fx
from rpq_fx.nn import RPQWeight
from rpq_fx.distributed import RPQDistributedError, broadcast_codes, check_codes_in_sync, gather_whole, index_buffers

BACKEND = os.environ.get("RPQ_FX_COMPILE_BACKEND", "aot_eager")  # the compile scenarios' torch.compile backend
STEPS, BATCH, WIDTH, OUT = 3, 8, 72, 95  # odd sizes: FSDP2 shards some tensors unevenly
SETTINGS = dict(codebook_dim=8, num_codes=16, progress=False)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 512), nn.Linear(512, WIDTH)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Net(nn.Module):
    """Two residual blocks and a head: every Linear converts (16 codewords of 8 values; fc1 and head have 9
    codebooks, head 95 biases: FSDP2 splits them 5 + 4, 48 + 47 rows)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, OUT)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Untraceable(Net):
    """Net with a data-dependent branch, which torch.fx cannot trace: convert rewrites it in place."""

    def forward(self, x):
        if x.isfinite().all():
            return super().forward(x)
        raise ValueError("non-finite input")


def converted(capture: str, checkpoint: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if capture == "in place":
        model = rpq_fx.convert(Untraceable(), checkpoint=checkpoint, **SETTINGS)
    elif capture == "module":
        model = rpq_fx.convert(Net(), checkpoint=checkpoint, capture="module", **SETTINGS)
    elif capture == "torch.export":
        model = rpq_fx.convert(Net(), checkpoint=checkpoint, example_inputs=torch.randn(BATCH, WIDTH), **SETTINGS)
    else:
        model = rpq_fx.convert(Net(), checkpoint=checkpoint, **SETTINGS)
    path = rpq_fx.conversion_record(model).path
    assert path.startswith(capture), (capture, path)
    assert len(index_buffers(model)) == 5, "every Linear converted"
    return model


def batches(rank: int | None):
    """STEPS (input, target) batches, the same on every rank; ``rank``'s half of each, or all of it for None."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, OUT, generator=g)) for _ in range(STEPS)]
    return data if rank is None else [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in data]


def train(model: nn.Module, data, path: str = "auto") -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with rpq_fx.compute_path(path):
        for x, y in data:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "none":  # the control: each rank trains alone on its half
        return model
    if wrapper == "ddp":
        return DistributedDataParallel(model)
    if wrapper == "fsdp blocks":
        for block in model.blocks:
            fully_shard(block)
    fully_shard(model)
    return model


def training(capture: str, wrapper: str, *, checkpoint=False, path="auto", compile=False) -> dict:
    rank = dist.get_rank()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = converted(capture, checkpoint)
    reference, start = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    train(reference, batches(None), path)
    wrapped = wrap(model, wrapper)
    inner = wrapped.module if wrapper == "ddp" else wrapped
    if compile and wrapper != "fsdp blocks":
        wrapped = torch.compile(wrapped, backend=BACKEND)
    elif compile:  # per block, as FSDP2's documentation does: a quarter of the compile time of the whole
        for block in inner.blocks:
            block.compile(backend=BACKEND)
    train(wrapped, batches(rank), path)
    check_codes_in_sync(wrapped)
    params = {name: full(p).detach() for name, p in inner.named_parameters()}
    expected = dict(reference.named_parameters())
    assert params.keys() == expected.keys()
    codes = {name: full(b) for name, b in inner.named_buffers()}
    return {
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "diff": max((params[n] - expected[n]).abs().max().item() for n in params),
        "moved": min((params[n] - start[n]).abs().max().item() for n in params),
        "codes_fixed": all(torch.equal(codes[n], start[n]) for n in codes),
        "rpq_path": rpq_fx.conversion_record(reference).path,
    }


def codes_sync(out: Path) -> dict:
    rank, result = dist.get_rank(), {}
    model = converted("torch.fx")
    check_codes_in_sync(model)
    if rank == 1:
        model.get_submodule("blocks.1.fc2.weight").codes[3, 5] += 1
    try:
        check_codes_in_sync(model)
    except RPQDistributedError as error:
        result["mismatch_error"] = str(error)
    result["broadcast"] = broadcast_codes(model)
    check_codes_in_sync(model)
    if rank == 1:  # DDP broadcasts rank 0's buffers when it wraps
        model.get_submodule("head.weight").codes.zero_()
    ddp = DistributedDataParallel(model)
    check_codes_in_sync(ddp)
    result["ddp_wrap_syncs"] = True
    torch.manual_seed(rank)  # int16 codes (300 codewords), different on each rank
    wide = nn.ModuleDict({"w": RPQWeight(4, 8, 50, num_codes=300)})
    result["int16_differ"] = not _agrees(wide)
    broadcast_codes(wide)
    result["int16_broadcast"] = _agrees(wide) and wide["w"].codes.dtype == torch.int16
    try:  # rank 1 passes a part of the model: another set of codes
        check_codes_in_sync(model if rank == 0 else model.blocks)
    except RPQDistributedError as error:
        result["layout_error"] = str(error)
    return result


def _agrees(model: nn.Module) -> bool:
    try:
        check_codes_in_sync(model)
        return True
    except RPQDistributedError:
        return False


def checkpoints(out: Path) -> dict:
    """rpq_fx.save of an FSDP2 model (rank 0 writes the gathered model) and DCP save / load, trained 3 steps."""
    rank = dist.get_rank()
    model = converted("in place")
    if rank == 0:
        rpq_fx.save(copy.deepcopy(model), out / "plain.safetensors")
    wrap(model, "fsdp blocks")
    rpq_fx.save(model, out / "fsdp.safetensors")  # before training: the same file as the unwrapped model's
    rpq_fx.save(model, out / f"fsdp_rank{rank}.safetensors")  # rank 1 writes nothing
    try:  # a path under a file: rank 0 cannot write it
        rpq_fx.save(model, out / "plain.safetensors" / "x.safetensors")
        failed = "saved"
    except Exception as error:
        failed = f"{type(error).__name__}: {error}"
    failures = [None, None]
    dist.all_gather_object(failures, failed)
    train(model, batches(rank))
    rpq_fx.save(model, out / "trained.safetensors")
    dcp.save(get_model_state_dict(model), checkpoint_id=out / "dcp")
    again = wrap(converted("in place"), "fsdp blocks")  # load 2 ranks -> 2 ranks
    state = get_model_state_dict(again)
    dcp.load(state, checkpoint_id=out / "dcp")
    set_model_state_dict(again, state)
    same = all(torch.equal(full(a), full(b)) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    codebooks = model.get_parameter("blocks.0.fc1.weight.codebooks")  # 9 rows: 5 on rank 0, 4 on rank 1
    whole, everywhere = gather_whole(codebooks), codebooks.full_tensor()
    mine = (codebooks.to_local().shape[0], whole is None if rank else torch.equal(whole, everywhere))
    gathered = [None, None]
    dist.all_gather_object(gathered, mine)
    return {"dcp_2_to_2_equal": same, "files": sorted(p.name for p in out.glob("*.safetensors")), "failures": failures,
            "placements": str(codebooks.placements), "gather_whole": gathered}


def finetune_models(layers: tuple = ()) -> tuple[nn.Module, nn.Module]:
    """The dense teacher and its converted student (random codebooks, to train from), the same on every rank;
    converted in place where ``layers`` are distilled too (their forwards must still run)."""
    torch.manual_seed(0)
    teacher = Untraceable() if layers else Net()
    return teacher, rpq_fx.convert(teacher, **SETTINGS)


def finetune_data(rank: int | None) -> tuple[list, list]:
    """Inputs to train on and to validate on: ``rank``'s half of each batch, or the whole for None."""
    data = [x for x, _ in batches(rank)]
    g = torch.Generator().manual_seed(2)
    validation = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(2)]
    return data, validation if rank is None else [x.chunk(2)[rank] for x in validation]


FINETUNE = {  # name: wrapper, loss, layers distilled too
    "plain": (None, None, ()), "ddp mse": ("ddp", F.mse_loss, ()), "fsdp": ("fsdp root", None, ()),
    "fsdp blocks, layers": ("fsdp blocks", None, ("blocks.0",)), "plain mse, layers": (None, F.mse_loss, ("blocks.1",)),
}
FINETUNE_ARGS = dict(steps=4, lr=1e-2, validate_every=2, progress=False)


def finetune(out: Path) -> dict:
    """rpq_fx.finetune on each rank's halves of the batches (the test runs one process on the wholes)."""
    rank, losses = dist.get_rank(), {}
    data, validation = finetune_data(rank)
    for name, (wrapper, loss, layers) in FINETUNE.items():
        teacher, student = finetune_models(layers)
        model = wrap(student, wrapper) if wrapper else student
        losses[name] = rpq_fx.finetune(model, teacher, data, loss=loss, layers=layers, validation=validation,
                                       **FINETUNE_ARGS)
        if wrapper or rank == 0:  # a wrapped model is saved by every rank calling save, a plain one by one rank
            rpq_fx.save(model, out / f"finetune {name}.safetensors")
    teacher, student = finetune_models()
    for what, change in (("values differ", lambda m: m.get_parameter("head.bias").data.add_(1)),
                         ("codes differ", lambda m: m.get_buffer("head.weight.codes")[0, 0].add_(1))):
        if rank == 1:
            change(student)
        try:
            rpq_fx.finetune(student, teacher, data, **FINETUNE_ARGS)
        except RPQDistributedError as error:
            losses[what] = str(error)
    try:
        rpq_fx.finetune(finetune_models()[1], teacher, data, validation=validation[:rank + 1], **FINETUNE_ARGS)
    except RPQDistributedError as error:
        losses["validation counts"] = str(error)
    fsdp = wrap(finetune_models()[1], "fsdp root")
    try:
        rpq_fx.save_dense(fsdp, out / "dense.safetensors")
    except ValueError as error:
        losses["save_dense sharded"] = str(error)
    return losses


def convert_wrapped(out: Path) -> dict:
    """What convert says of a model wrapped before it was converted."""
    said = {}
    for wrapper in ("ddp", "fsdp"):
        torch.manual_seed(0)
        try:
            rpq_fx.convert(wrap(Net(), "ddp" if wrapper == "ddp" else "fsdp root"), **SETTINGS)
            said[wrapper] = "converted"
        except Exception as error:
            said[wrapper] = f"{type(error).__name__}: {error}"
    return said


SCENARIOS = {
    "fx ddp": lambda out: training("torch.fx", "ddp"),
    "fx fsdp": lambda out: training("torch.fx", "fsdp root"),
    "export ddp": lambda out: training("torch.export", "ddp"),
    "export fsdp": lambda out: training("torch.export", "fsdp root"),
    "in place ddp": lambda out: training("in place", "ddp"),
    "in place fsdp blocks": lambda out: training("in place", "fsdp blocks"),
    "checkpoint ddp": lambda out: training("in place", "ddp", checkpoint=True),
    "module ddp": lambda out: training("module", "ddp"),
    "module fsdp blocks": lambda out: training("module", "fsdp blocks"),
    "checkpoint fsdp": lambda out: training("module", "fsdp blocks", checkpoint=True),
    "compressed ddp": lambda out: training("torch.fx", "ddp", path="compressed"),
    "compressed fsdp": lambda out: training("module", "fsdp blocks", path="compressed"),
    "alone": lambda out: training("torch.fx", "none"),
    "compile ddp": lambda out: training("torch.fx", "ddp", compile=True),
    "compile fsdp": lambda out: training("in place", "fsdp blocks", compile=True),
    "compile fsdp root": lambda out: training("in place", "fsdp root", compile=True),
    "codes sync": codes_sync,
    "checkpoints": checkpoints,
    "finetune": finetune,
    "convert wrapped": convert_wrapped,
}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:] or list(SCENARIOS)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name in names:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            results[name] = SCENARIOS[name](out)
        except Exception as error:  # recorded for the test to show; the other scenarios still run
            results[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
        dist.barrier()
        results[name].update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
