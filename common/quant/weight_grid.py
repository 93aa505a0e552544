"""Weight grids: per-channel or per-group uniform grids, with optional MSE clip search.

A row x of W (or a group of its columns) gets the grid of `common.quant.grid` on [min(x, 0), max(x, 0)].
With MSE clip search the range is shrunk by p = 1 - i/100, i = 0..79, and each row keeps the p with the
least sum |Q(x) - x|^2.4 (the GPTQ/QuaRot convention).
"""
from __future__ import annotations

import torch

from common.quant.grid import check_bits, fake_quantize, grid_params

__all__ = ["fit_grid", "MSE_NORM", "MSE_STEPS", "MSE_MAXSHRINK"]

MSE_NORM = 2.4
MSE_STEPS = 100
MSE_MAXSHRINK = 0.8


@torch.no_grad()
def fit_grid(x: torch.Tensor, bits: int, sym: bool = False, mse: bool = False,
             scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of shape [rows, 1] for the 2-D tensor x (rows are output channels).

    scale_dtype (e.g. torch.float16) rounds the chosen scales to what a checkpoint stores, so that the
    fake-quantized weights equal what an inference kernel dequantizes.
    """
    check_bits(bits, "weight bits")
    x = x.float()
    zero_t = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(dim=1, keepdim=True), zero_t)
    xmax = torch.maximum(x.amax(dim=1, keepdim=True), zero_t)
    scale, zero = grid_params(xmin, xmax, bits, sym)
    if mse:
        scale, zero = _mse_search(x, xmin, xmax, scale, zero, bits, sym)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(x.dtype)
    return scale, zero


def _mse_search(x, xmin, xmax, scale, zero, bits, sym):
    best = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAXSHRINK * MSE_STEPS)):
        p = 1.0 - i / MSE_STEPS
        s, z = grid_params(p * xmin, p * xmax, bits, sym)
        err = (fake_quantize(x, s, z, bits) - x).abs_().pow_(MSE_NORM).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
