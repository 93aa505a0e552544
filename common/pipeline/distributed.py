"""Data-parallel calibration over torch.distributed ranks (torchrun; NCCL on GPUs, gloo on CPU).

The calibration batches are sharded round robin over R ranks; rank r accumulates its own sums and the statistics
of all ranks are added with one all-reduce (`common.pipeline.hessian`), so R processes produce the same H as one.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for a single rank.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["launched", "init", "shutdown", "world_size", "rank", "is_main", "barrier", "shard", "owner",
           "broadcast_", "broadcast_module_", "all_reduce_sum_", "all_gather_object"]

T = TypeVar("T")
TIMEOUT = timedelta(hours=1)  # ranks wait for rank 0's checkpoint writes and the largest solves


def launched() -> bool:
    """True when started by torchrun (or any launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | str) -> torch.device:
    """Join the process group of a torchrun launch and return this rank's device (cuda:LOCAL_RANK for a CUDA
    `device` given without an index, else `device`); returns `device` unchanged when not launched."""
    device = torch.device(device)
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: with torchrun pass --device cuda; rank r uses cuda:LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (the only rank that evaluates and writes results)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: items[rank::world_size] (all of them in a single process)."""
    return list(items[rank()::world_size()])


def owner(index: int) -> int:
    """The rank that solves the index-th linear of a group (round robin)."""
    return index % world_size()


def broadcast_(tensor: torch.Tensor, src: int) -> None:
    """In place: every rank's `tensor` becomes rank src's; sent as raw bytes, so any dtype works."""
    if world_size() == 1:
        return
    buf = tensor if tensor.is_contiguous() else tensor.contiguous()
    dist.broadcast(buf.reshape(-1).view(torch.uint8), src)
    if buf is not tensor:
        tensor.copy_(buf)


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` becomes rank src's (guards against ranks drifting apart)."""
    if world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            broadcast_(t.data, src)


def all_reduce_sum_(tensors: Sequence[torch.Tensor | None]) -> None:
    """In place: each tensor becomes its sum over the ranks (None entries are skipped; a no-op in one process)."""
    if world_size() == 1:
        return
    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; keep tensors on the CPU)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
