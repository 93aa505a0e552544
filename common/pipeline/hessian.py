"""Calibration statistics of one linear layer, summed over batches and over torchrun ranks.

    H = (2/N) sum_t x~_t x~_t^T,    dXXT = (2/N) sum_t (x_t - x~_t) x~_t^T    (GPTAQ),
N the token count of all ranks, x~ the input the quantized model gives the layer, x the full-precision one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from common.pipeline import distributed
from common.solver import tf32

__all__ = ["HessianAccumulator", "DXXT_PRODUCTS"]

# How CUDA forms GPTAQ's sum dX^T X~ from float16/bfloat16 activations:
#   "difference": sum X^T X~ on fp16/bf16 tensor cores (exact products, float32 accumulation), minus the sum
#                 X~^T X~ of H at the end: one product at the fp16 rate.  The float32 rounding of the two sums,
#                 relative to dXXT, grows by up to |X| / |X - X~|; measured on an H200 with W4A4-like inputs
#                 (|dX| / |X| = 0.13): 1.2e-5 (4096 columns) and 6.9e-6 (11008) against float64, where "split"
#                 has 4.4e-6 (bench/RESULTS.md), and 3.2x / 3.3x faster per batch than "split"
#   "split":      dX = X - X~ (float32) as TF32 hi + lo, two TF32 products with X~
DXXT_PRODUCTS = ("difference", "split")  # HessianAccumulator(dxxt_product=...), default "difference"
_ALIAS_OK: dict[torch.device, bool] = {}


def _gemm_accumulate_ok(device: torch.device) -> bool:
    """Whether aten.addmm's out_dtype form adds a float16 product into a float32 `out` that is also its `self`
    (C += A B in the GEMM's epilogue); probed once per device on small integers, where every result is exact."""
    if device not in _ALIAS_OK:
        try:
            a = torch.arange(-8, 8, device=device, dtype=torch.float16).repeat(16, 8)  # [16, 128]
            c = torch.full((16, 16), 3.0, device=device)
            want = c + a.float() @ a.float().t()
            torch.ops.aten.addmm.dtype_out(c, a, a.t(), torch.float32, out=c)
            _ALIAS_OK[device] = bool(torch.equal(c, want))
        except (RuntimeError, AttributeError, TypeError):  # torch without out_dtype products on this device
            _ALIAS_OK[device] = False
    return _ALIAS_OK[device]


class HessianAccumulator:
    """H = (2/N) sum_t x~_t x~_t^T and, when asymmetric, dXXT = (2/N) sum_t (x_t - x~_t) x~_t^T over all ranks.

    On CUDA in one process the raw sums are float32 and each batch's product is added to them by the GEMM itself
    (beta = 1): from float16/bfloat16 activations on fp16/bf16 tensor cores (exact products, float32 accumulation;
    dXXT as `dxxt_product` says, see DXXT_PRODUCTS), from float32 ones in float32.  Elsewhere (CPU, or torchrun with
    several processes) each batch's float32 product is added to float64 sums, so the totals do not depend on how the
    batches are split over ranks.  Either way the sums hold float32-accurate values.
    `all_reduce()` adds the sums of every rank; the first read of H or dXXT materialises both in float32 and frees
    the sums (no more `add` after that).
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu", asymmetric: bool = False,
                 dxxt_product: str = "difference"):
        if dxxt_product not in DXXT_PRODUCTS:
            raise ValueError(f"dxxt_product: expected one of {', '.join(DXXT_PRODUCTS)}, got {dxxt_product!r}")
        self.columns = columns
        self.dxxt_product = dxxt_product
        self.nsamples = 0
        device = torch.device(device)
        # float32 sums accumulated by the GEMMs on one GPU; float64 sums under torchrun, so that the totals do not
        # depend on how the batches are split over the ranks (N processes give the weights of 1)
        self._gemm = device.type == "cuda" and distributed.world_size() == 1
        dtype = torch.float32 if self._gemm else torch.float64
        self._S = torch.zeros(columns, columns, dtype=dtype, device=device)
        self._D = torch.zeros(columns, columns, dtype=dtype, device=device) if asymmetric else None
        self._asymmetric = asymmetric
        self._difference = False  # _D holds sum X^T X~ (dxxt_product "difference"), fixed by the first add
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
        if self._gemm:
            self._add_gemm(x_tilde.reshape(-1, self.columns).to(self._S.device),
                           None if x is None else x.reshape(-1, self.columns).to(self._S.device))
        else:
            xt = x_tilde.reshape(-1, self.columns).to(self._S.device, torch.float32)
            self._S.add_(xt.t() @ xt)
            if self._D is not None:
                dx = x.reshape(-1, self.columns).to(self._S.device, torch.float32) - xt
                self._D.add_(dx.t() @ xt)
        self.nsamples += x_tilde.numel() // self.columns

    def _add_gemm(self, xt: torch.Tensor, x: torch.Tensor | None) -> None:
        """CUDA: S += xt^T xt (and the dXXT sum), each product added to the float32 sums by its GEMM."""
        exact = xt.dtype in tf32.EXACT_DTYPES and (x is None or x.dtype in tf32.EXACT_DTYPES)
        half = exact and (x is None or x.dtype == xt.dtype) and _gemm_accumulate_ok(self._S.device)
        if self.nsamples == 0:
            self._difference = half and self._D is not None and self.dxxt_product == "difference"
        elif self._difference and not half:
            raise RuntimeError("HessianAccumulator: a float32 batch after float16/bfloat16 ones")
        if half:  # fp16/bf16 tensor cores: exact products, float32 accumulation
            torch.ops.aten.addmm.dtype_out(self._S, xt.t(), xt, torch.float32, out=self._S)
            if self._difference:
                torch.ops.aten.addmm.dtype_out(self._D, x.t(), xt, torch.float32, out=self._D)
            if self._D is None or self._difference:
                return
        xt32 = xt.float()
        with tf32.tf32(exact):  # TF32 holds float16/bfloat16 values exactly
            if not half:
                self._S.addmm_(xt32.t(), xt32)
            if self._D is None:
                return
            dx = x.float() - xt32
            if exact:  # dX is not TF32-exact: hi + lo, each of the two products exact in TF32
                hi, lo = tf32.split(dx)
                self._D.addmm_(hi.t(), xt32)
                self._D.addmm_(lo.t(), xt32)
            else:
                self._D.addmm_(dx.t(), xt32)

    def clone(self) -> "HessianAccumulator":
        """An independent copy (same sums and token count) that later batches can go on adding to."""
        if self._S is None:
            raise RuntimeError("HessianAccumulator: clone() after H was read")
        twin = HessianAccumulator(self.columns, self._S.device, self._asymmetric, self.dxxt_product)
        twin.nsamples, twin._difference = self.nsamples, self._difference
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
            if self._difference:  # sum X^T X~ - sum X~^T X~ = sum dX^T X~
                self._D.sub_(self._S)
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
