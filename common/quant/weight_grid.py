"""Weight grids: per-channel or per-group uniform grids, with optional MSE clip search.

A row x of W (or a group of its columns) gets the grid of `common.quant.grid` on [min(x, 0), max(x, 0)].
With MSE clip search the range is shrunk by p = 1 - i/100, i = 0..79, and each row keeps the p with the
least sum |Q(x) - x|^2.4 (the GPTQ/QuaRot convention).
Symmetric grids come in two conventions (`SYM_GRIDS`), both with zero point 2^(b-1):
  "quarot" (QuaRot and the GPTAQ paper code, the default): scale = amax / (2^(b-1) - 1), levels -2^(b-1)..2^(b-1)-1;
  "gptq"   (IST-DASLab GPTQ, AutoGPTQ, GPTQModel's weight-only quantizer): scale = 2 amax / (2^b - 1), i.e. the
           asymmetric grid on [-amax, amax]; as there, a range with no negative entry keeps its lower end at 0
           (scale = amax / (2^b - 1)) and an all-zero range becomes [-1, 1].
"""
from __future__ import annotations

import torch

from common.quant import mse_triton
from common.quant.grid import check_bits, fake_quantize, grid_params

__all__ = ["fit_grid", "sym_grid_params", "SYM_GRIDS", "MSE_NORM", "MSE_STEPS", "MSE_MAXSHRINK"]

SYM_GRIDS = ("quarot", "gptq")
MSE_NORM = 2.4
MSE_STEPS = 100
MSE_MAXSHRINK = 0.8


def sym_grid_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, sym_grid: str = "quarot"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`grid_params` (asymmetric, or the "quarot" symmetric grid), or GPTQ's symmetric weight grid for
    sym_grid "gptq": [lo, amax] with amax = max(|xmin|, xmax), lo = -amax where xmin < 0 (else 0), scale
    (amax - lo) / (2^b - 1), zero 2^(b-1)."""
    if sym_grid not in SYM_GRIDS:
        raise ValueError(f"sym_grid must be one of {', '.join(SYM_GRIDS)}, got {sym_grid!r}")
    if not sym or sym_grid == "quarot":
        return grid_params(xmin, xmax, bits, sym)
    amax = torch.maximum(xmin.abs(), xmax)
    lo = torch.where(xmin < 0, -amax, xmin)
    dead = amax == 0
    lo = torch.where(dead, -1.0, lo)
    hi = torch.where(dead, 1.0, amax)
    scale = (hi - lo) / (2**bits - 1)
    return scale, torch.full_like(scale, float(2 ** (bits - 1)))


@torch.no_grad()
def fit_grid(x: torch.Tensor, bits: int, sym: bool = False, mse: bool = False,
             scale_dtype: torch.dtype | None = None, sym_grid: str = "quarot",
             fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of shape [rows, 1] for the 2-D tensor x (rows are output channels).

    scale_dtype (e.g. torch.float16) rounds the chosen scales to what a checkpoint stores, so that the
    fake-quantized weights equal what an inference kernel dequantizes; sym_grid: the symmetric convention
    (`SYM_GRIDS`, ignored for asymmetric grids); fused: run the MSE clip search as one Triton kernel
    (`common.quant.mse_triton`) where it can run, else the PyTorch loop.
    """
    check_bits(bits, "weight bits")
    x = x.float()
    zero_t = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=1, keepdim=True), zero_t)
    xmax = torch.maximum(x.amax(dim=1, keepdim=True), zero_t)
    scale, zero = sym_grid_params(xmin, xmax, bits, sym, sym_grid)
    if mse and fused and mse_triton.available(x):
        scale, zero = mse_triton.mse_search(x, xmin, xmax, bits, sym, sym_grid, MSE_STEPS,
                                            int(MSE_MAXSHRINK * MSE_STEPS), MSE_NORM)
    elif mse:
        scale, zero = _mse_search(x, xmin, xmax, scale, zero, bits, sym, sym_grid)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(x.dtype)
    return scale, zero


def _mse_search(x, xmin, xmax, scale, zero, bits, sym, sym_grid):
    best = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAXSHRINK * MSE_STEPS)):
        p = 1.0 - i / MSE_STEPS
        s, z = sym_grid_params(p * xmin, p * xmax, bits, sym, sym_grid)
        err = (fake_quantize(x, s, z, bits) - x).abs_().pow_(MSE_NORM).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
