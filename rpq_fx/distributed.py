"""Converted models under ``torch.distributed``: DDP and FSDP2 (``fully_shard``) train them as they are.

Codebooks are ordinary Parameters: DDP all-reduces their gradients, FSDP2 shards them. Codes are
buffers that never change in training, and must be the same on every rank. DDP broadcasts rank 0's
buffers when it wraps a model (unless ``broadcast_buffers=False``), and by default again before
every forward (``forward_sync_buffers=False``, torch 2.14, keeps the first and drops the others);
FSDP2 shards parameters only and leaves buffers as each rank made them. :func:`broadcast_codes`
copies rank 0's codes to every rank (before or after wrapping); :func:`check_codes_in_sync` raises
if any rank's differ. Convert first, then wrap: ``convert`` refuses a wrapped model.
"""

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .nn.weight import RPQWeight

__all__ = ["RPQDistributedError", "broadcast_codes", "check_codes_in_sync", "check_in_sync", "index_buffers",
           "average_gradients", "gather_whole", "require_process_group", "unwrap", "is_data_parallel", "is_sharded",
           "original_class"]


class RPQDistributedError(RuntimeError):
    """Ranks that disagree (codes that differ) or a distributed call without a process group."""


def require_process_group(what: str) -> None:
    """Raise unless ``torch.distributed`` has an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RPQDistributedError(f"{what}: needs an initialised torch.distributed process group: start the script "
                                  "with torchrun (torchrun --nproc-per-node 2 script.py) and call "
                                  "torch.distributed.init_process_group() first")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (FSDP2 needs none: ``fully_shard`` keeps
    the module object and its names). Call rpq_fx on the module you gave ``torch.compile``, not on
    what it returns."""
    return model.module if is_data_parallel(model) else model


def is_data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def original_class(module: nn.Module) -> type:
    """The class of ``module`` as it was before ``fully_shard`` (which swaps in ``FSDP<Class>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gather_whole(tensor: Tensor, dst: int = 0) -> Tensor | None:
    """The whole of DTensor ``tensor`` on rank ``dst`` (a global rank), None on the other ranks, which
    must call it too. FSDP2's layout (rows split as ``torch.chunk`` does, over a 1-D mesh) is
    gathered onto ``dst`` alone; any other layout is gathered on every rank and kept on ``dst``."""
    from torch.distributed.tensor import Shard

    mine = dist.get_rank() == dst
    if tensor.device_mesh.ndim != 1 or tuple(tensor.placements) != (Shard(0),):
        whole = tensor.full_tensor()
        return whole.detach() if mine else None
    group = tensor.device_mesh.get_group()
    world, rows = dist.get_world_size(group), tensor.shape[0]
    chunk = -(-rows // world)
    local = tensor.to_local().detach()
    padded = local.new_zeros((chunk, *tensor.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)] if mine else None
    dist.gather(padded, parts, dst=dst, group=group)
    return torch.cat(parts)[:rows] if mine else None


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2's sharded parameters)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def index_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{name: buffer}`` of every code and hot-row index of the RPQ weights in ``model``."""
    model = unwrap(model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, RPQWeight):
            for buffer in module.index_bounds():
                found[f"{name}.{buffer}" if name else buffer] = getattr(module, buffer)
    return found


def broadcast_codes(model: nn.Module, src: int = 0, group=None) -> int:
    """Copy rank ``src``'s (a global rank) codes and hot-row indices into every rank's ``model``, in
    place; returns how many buffers. Every rank of ``group`` must call it, with the same architecture."""
    require_process_group("broadcast_codes")
    buffers = index_buffers(model)
    _check_same_names(buffers, "broadcast_codes", group)
    for tensor in buffers.values():
        data = tensor.contiguous()
        # reason: gloo has no int16 collectives; the bytes travel as uint8
        dist.broadcast(data.view(torch.uint8), src=src, group=group)
        if data is not tensor:
            tensor.copy_(data)
    return len(buffers)


def _check_same_names(buffers: dict[str, Tensor], what: str, group) -> None:
    """Raise unless every rank holds the same buffer names, shapes and dtypes (else a collective hangs)."""
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in buffers.items()]
    layouts = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    for rank, other in enumerate(layouts):
        if other != layout:
            theirs, mine = next((a, b) for a, b in zip(other + [None], layout + [None]) if a != b)
            raise RPQDistributedError(f"{what}: rank {rank} holds another model than rank {dist.get_rank(group)}: "
                                      f"codes {theirs} there against {mine} here (name, shape, dtype); every rank "
                                      "must convert the same architecture with the same settings")


def check_codes_in_sync(model: nn.Module, group=None, *, caller: str = "check_codes_in_sync") -> int:
    """Raise :class:`RPQDistributedError` unless every rank of ``group`` holds the same codes (and
    hot-row indices) in ``model``, naming the first buffer that differs and the ranks; returns how
    many buffers were compared. A digest per buffer travels, not the codes. Every rank must call it."""
    require_process_group(caller)
    buffers = index_buffers(model)
    _check_same_names(buffers, caller, group)
    check_in_sync(buffers, f"{caller}: the codes", "convert with the same seed and settings on every rank, or call "
                  "rpq_fx.distributed.broadcast_codes(model) before training", group)
    return len(buffers)


def check_in_sync(tensors: dict[str, Tensor], what: str, advice: str, group=None) -> None:
    """Raise :class:`RPQDistributedError` naming the first of ``tensors`` (the same names on every rank)
    whose values differ between rank 0 and another rank of ``group``: "{what} '{name}' differ ..."."""
    digests = [_digest(t) for t in tensors.values()]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, digests, group=group)
    for rank, theirs in enumerate(everyone):
        for name, first, other in zip(tensors, everyone[0], theirs):
            if first != other:
                raise RPQDistributedError(f"{what} '{name}' differ between rank 0 and rank {rank}; {advice}")


def average_gradients(params: list[Tensor], group=None) -> None:
    """Replace each gradient of ``params`` (the same list on every rank) by its mean over the ranks of
    ``group``, as DDP does; a parameter without a gradient on some ranks counts as zero there, and
    keeps none where no rank has one."""
    world = dist.get_world_size(group)
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(flags, group=group)
    for p, count in zip(params, flags.tolist()):
        if count:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)


def _digest(tensor: Tensor) -> str:
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()
