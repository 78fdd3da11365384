"""DistributedDataParallel set-up under torchrun: rank 0 alone writes, every rank samples its own shard."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start(device: torch.device) -> Context:
    """Join the process group torchrun described in the environment (single process otherwise).

    On GPUs each process takes the GPU of its local rank (unless the device names one), and the
    group has gloo beside NCCL for the small CPU tensors of :func:`broadcast_flag` and :func:`gather`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(local_rank)  # otherwise every process of a node would use GPU 0
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def stop(context: Context) -> None:
    """Leave the process group once every rank is done talking (tearing gloo down while a peer
    still communicates can abort a process with std::terminate)."""
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_flag(flag: bool, context: Context) -> bool:
    """True on every rank when any rank says so (e.g. a stop request)."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather(value: float, context: Context) -> list[float]:
    """``value`` from every rank, in rank order."""
    if not context.distributed:
        return [value]
    tensor = torch.tensor([value], dtype=torch.float64)
    gathered = [torch.zeros_like(tensor) for _ in range(context.world_size)]
    dist.all_gather(gathered, tensor)
    return [float(t.item()) for t in gathered]
