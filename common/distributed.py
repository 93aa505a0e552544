"""Data-parallel calibration over torch.distributed ranks (torchrun; NCCL on GPUs, gloo on CPU).

The calibration batches are sharded round robin over R ranks; rank r accumulates its own sums and the statistics
of all ranks are added with one all-reduce, so every rank holds
    H = (2/N) sum_{r} sum_{t in shard r} x~_t x~_t^T,    dXXT = (2/N) sum_r sum_t (x_t - x~_t) x~_t^T,
with N the token count of all ranks.  The sums are kept in float64 (each batch's product in float32, on TF32
tensor cores when the activations are float16/bfloat16, where that is exact: common.tf32), which makes them
independent of how the batches are split over ranks, so R processes produce the same H as one process.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for a single rank.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import tf32

__all__ = ["launched", "init", "shutdown", "world_size", "rank", "is_main", "barrier", "shard", "owner",
           "broadcast_", "broadcast_module_", "all_reduce_sum_", "all_gather_object", "SummedHessian"]

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


class SummedHessian:
    """H = (2/N) sum_t x~_t x~_t^T and, when asymmetric, dXXT = (2/N) sum_t (x_t - x~_t) x~_t^T over all ranks.

    Same interface as `common.hessian.HessianAccumulator` (add, H, dXXT, nsamples, columns), but the raw sums are
    float64, so their value does not depend on the batch order or on how batches are split over ranks.
    `all_reduce()` adds the sums of every rank; the first read of H or dXXT materialises both in float32 and frees
    the float64 sums (no more `add` after that).
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", asymmetric: bool = False):
        self.columns = columns
        self.nsamples = 0
        self._S = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self._D = torch.zeros(columns, columns, dtype=torch.float64, device=device) if asymmetric else None
        self._asymmetric = asymmetric
        self._H: torch.Tensor | None = None
        self._dXXT: torch.Tensor | None = None

    @property
    def asymmetric(self) -> bool:
        return self._asymmetric

    @torch.no_grad()
    def add(self, x_tilde: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Add a batch: x_tilde (quantized-model inputs) and, for GPTAQ, x (full-precision inputs), [..., columns]."""
        if self._S is None:
            raise RuntimeError("SummedHessian: add() after H was read")
        if x_tilde.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got shape {tuple(x_tilde.shape)}")
        if self._D is not None and (x is None or x.shape != x_tilde.shape):
            raise ValueError("GPTAQ statistics need the full-precision input x with the same shape as x_tilde")
        # fp16/bf16 activations on CUDA: TF32 products are exact (common.tf32); dX = X - X~ is split into hi + lo
        exact = self._S.is_cuda and x_tilde.dtype in tf32.EXACT_DTYPES and (x is None or x.dtype in tf32.EXACT_DTYPES)
        xt = x_tilde.reshape(-1, self.columns).to(self._S.device, torch.float32)
        with tf32.tf32(exact):
            self._S.add_(xt.t() @ xt)
            if self._D is not None:
                dx = x.reshape(-1, self.columns).to(self._S.device, torch.float32) - xt
                if exact:
                    hi, lo = tf32.split(dx)
                    self._D.add_(torch.addmm(hi.t() @ xt, lo.t(), xt))
                else:
                    self._D.add_(dx.t() @ xt)
        self.nsamples += xt.shape[0]

    def clone(self) -> "SummedHessian":
        """An independent copy (same sums and token count) that later batches can go on adding to."""
        if self._S is None:
            raise RuntimeError("SummedHessian: clone() after H was read")
        twin = SummedHessian(self.columns, self._S.device, self._asymmetric)
        twin.nsamples = self.nsamples
        twin._S.copy_(self._S)
        if self._D is not None:
            twin._D.copy_(self._D)
        return twin

    def all_reduce(self) -> None:
        """Sum the token counts and raw sums of all ranks (every rank gets the totals); no-op in one process."""
        if world_size() == 1:
            return
        if self._S is None:
            raise RuntimeError("SummedHessian: all_reduce() after H was read")
        n = torch.tensor([self.nsamples], dtype=torch.float64, device=self._S.device)
        for t in (n, self._S, self._D):
            if t is not None:
                dist.all_reduce(t)
        self.nsamples = int(n.item())

    def _materialise(self) -> None:
        if self._S is not None:
            scale = 2.0 / max(self.nsamples, 1)
            self._H = self._S.mul_(scale).float()
            self._dXXT = self._D.mul_(scale).float() if self._D is not None else None
            self._S = self._D = None

    @property
    def H(self) -> torch.Tensor:
        self._materialise()
        return self._H

    @property
    def dXXT(self) -> torch.Tensor | None:
        self._materialise()
        return self._dXXT
