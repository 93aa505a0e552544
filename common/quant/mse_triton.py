"""Fused MSE clip search of the weight grid: one Triton kernel instead of 80 rounds of ~12 PyTorch passes.

For each row x of W (or of a group of its columns) and each shrink p_i = 1 - i/100, i = 0..79, the grid of
`common.quant.weight_grid.sym_grid_params` on [p_i min(x, 0), p_i max(x, 0)] is formed and
err_i = sum_j |Q_i(x_j) - x_j|^2.4; the row keeps the first i with the least err_i (`weight_grid._mse_search`).
A program holds all 80 candidate grids of one row and reads the row once, in column tiles, accumulating the 80
errors.  Grid parameters are computed as PyTorch computes them on the same device (a division by a Python number
is, on CUDA, a product with the float32 reciprocal; tensor divisions are IEEE, rounding is half to even), so every
candidate grid equals PyTorch's bit for bit; only the order in which err_i is summed differs, which can change the
chosen i where two candidates' errors agree to float32 rounding (bench/profile_e2e.py counts the rows).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from common.quant.act_triton import grid_params
except ImportError:  # CPU-only installs: fit_grid keeps its PyTorch loop
    triton = None

__all__ = ["available", "mse_search"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can take the 2-D float32 tensor x (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return (triton is not None and x.dim() == 2 and x.dtype == torch.float32 and x.numel() > 0
            and (x.is_cuda or (INTERPRET and x.device.type == "cpu")))


if triton is not None:

    @triton.jit
    def _mse_rows(X, XMIN, XMAX, PS, SCALE, ZERO, cols, stride_r, stride_c, steps, maxq, half, inv_div, norm,
                  SYM: tl.constexpr, GPTQ_SYM: tl.constexpr, RECIP: tl.constexpr, POWF: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        i = tl.arange(0, BLOCK_P)
        pmask = i < steps
        p = tl.load(PS + i, mask=pmask, other=1.0)
        xmin = tl.load(XMIN + r) * p  # [BLOCK_P]: the candidate ranges
        xmax = tl.load(XMAX + r) * p
        scale, zero = grid_params(xmin, xmax, maxq, half, inv_div, SYM, GPTQ_SYM, RECIP)
        err = tl.zeros([BLOCK_P], dtype=tl.float32)
        c = tl.arange(0, BLOCK_C)
        for c1 in range(0, cols, BLOCK_C):
            cmask = (c1 + c) < cols
            x = tl.load(X + r.to(tl.int64) * stride_r + (c1 + c) * stride_c, mask=cmask, other=0.0)
            u = tl.math.div_rn(x[None, :], scale[:, None])
            u = (u + 12582912.0) - 12582912.0
            q = tl.minimum(tl.maximum(u + zero[:, None], 0.0), maxq)
            e = tl.abs(scale[:, None] * (q - zero[:, None]) - x[None, :])
            if POWF:
                e = libdevice.pow(e, norm)  # CUDA's powf, as PyTorch's pow
            else:  # the interpreter has no libdevice
                e = tl.where(e > 0.0, tl.exp2(norm * tl.log2(tl.maximum(e, 1e-30))), 0.0)
            err += tl.sum(tl.where(cmask[None, :], e, 0.0), axis=1)
        err = tl.where(pmask, err, float("inf"))
        best = tl.min(err, axis=0)
        first = tl.min(tl.where(err == best, i, BLOCK_P), axis=0)  # the first i with the least error
        first = tl.where(first < steps, first, 0)  # NaN errors everywhere: the unshrunk grid, as PyTorch's loop
        tl.store(SCALE + r, tl.sum(tl.where(i == first, scale, 0.0), axis=0))
        tl.store(ZERO + r, tl.sum(tl.where(i == first, zero, 0.0), axis=0))


@functools.lru_cache(maxsize=None)
def _shrinks(steps: int, count: int, device: torch.device) -> torch.Tensor:
    """The candidates p = 1 - i / steps, i < count, as PyTorch's `p * tensor` rounds a Python float (float32), on
    `device`: made once, not per call (a group-wise solve calls the search once per group)."""
    return torch.tensor([np.float32(1.0 - i / steps) for i in range(count)], dtype=torch.float32, device=device)


def mse_search(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, sym_grid: str,
               steps: int, maxshrink_steps: int, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [rows, 1] of the least-error candidate grid per row of x (float32 [rows, cols]); xmin / xmax
    [rows, 1] the row ranges (containing 0).  Candidates p = 1 - i / steps, i < maxshrink_steps.  Call only where
    `available(x)`."""
    rows, cols = x.shape
    ps = _shrinks(steps, maxshrink_steps, x.device)
    gptq_sym = sym and sym_grid == "gptq"
    divisor = 2**bits - 1 if (not sym or gptq_sym) else 2 ** (bits - 1) - 1
    inv_div = float(np.float32(1.0) / np.float32(divisor))
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    block_p = triton.next_power_of_2(maxshrink_steps)
    _mse_rows[(rows,)](x, xmin.contiguous(), xmax.contiguous(), ps, scale, zero, cols, x.stride(0), x.stride(1),
                       maxshrink_steps, float(2**bits - 1), float(2 ** (bits - 1)), inv_div, float(norm), SYM=sym,
                       GPTQ_SYM=gptq_sym, RECIP=x.is_cuda, POWF=x.is_cuda, BLOCK_P=block_p, BLOCK_C=32, num_warps=4,
                       enable_fp_fusion=False)
    return scale, zero
