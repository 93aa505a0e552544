"""Calibration statistics of one linear layer, summed over batches and over torchrun ranks.

    H = (2/N) sum_t x~_t x~_t^T,    dXXT = (2/N) sum_t (x_t - x~_t) x~_t^T    (GPTAQ),
N the token count of all ranks, x~ the input the quantized model gives the layer, x the full-precision one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from common.pipeline import distributed
from common.solver import tf32

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    """H = (2/N) sum_t x~_t x~_t^T and, when asymmetric, dXXT = (2/N) sum_t (x_t - x~_t) x~_t^T over all ranks.

    The raw sums are float64 (each batch's product in float32, on TF32 tensor cores when the activations are
    float16/bfloat16, where that is exact: common.solver.tf32), so their value does not depend on the batch order
    or on how batches are split over ranks.
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
            raise RuntimeError("HessianAccumulator: add() after H was read")
        if x_tilde.shape[-1] != self.columns:
            raise ValueError(f"expected inputs with {self.columns} features, got shape {tuple(x_tilde.shape)}")
        if self._D is not None and (x is None or x.shape != x_tilde.shape):
            raise ValueError("GPTAQ statistics need the full-precision input x with the same shape as x_tilde")
        # fp16/bf16 activations on CUDA: TF32 products are exact (common.solver.tf32); dX = X - X~ is split into hi + lo
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

    def clone(self) -> "HessianAccumulator":
        """An independent copy (same sums and token count) that later batches can go on adding to."""
        if self._S is None:
            raise RuntimeError("HessianAccumulator: clone() after H was read")
        twin = HessianAccumulator(self.columns, self._S.device, self._asymmetric)
        twin.nsamples = self.nsamples
        twin._S.copy_(self._S)
        if self._D is not None:
            twin._D.copy_(self._D)
        return twin

    def all_reduce(self) -> None:
        """Sum the token counts and raw sums of all ranks (every rank gets the totals); no-op in one process."""
        if distributed.world_size() == 1:
            return
        if self._S is None:
            raise RuntimeError("HessianAccumulator: all_reduce() after H was read")
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
