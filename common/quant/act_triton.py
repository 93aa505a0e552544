"""Fused per-token activation quantizer: one Triton kernel per call instead of ~12 PyTorch passes.

For each row x (a token, or a group of `groupsize` channels) it computes, in float32 and in the same order as
`common.quant.act_quant.ActQuantizer`'s PyTorch code, xmin = c min(min(x), 0), xmax = c max(max(x), 0), the grid
of `common.quant.grid.grid_params` and x^ = s (clamp(round(x / s) + z, 0, maxq) - z), cast back to x's dtype.
Division is IEEE (div_rn), rounding half to even, min / max are exact in any order and nothing is contracted
into an FMA; a division by the Python numbers maxq (asymmetric) or 2^(b-1) - 1 (symmetric) is, as PyTorch's CUDA
kernels do it, a product with the float32 reciprocal (RECIP; PyTorch on CPU divides), so the output equals the
PyTorch quantizer's on the same device bit for bit (tests/test_act_quant_fused.py checks it under
TRITON_INTERPRET=1; bench/profile_e2e.py on the GPU).  The row is read once and written once, or read twice in
chunks for the widths that `LAUNCH` says run faster so (one kernel or the other, the same output).
`grid_params` (the grid of a range, in that arithmetic) is shared with the weight grid's MSE search
(common.quant.mse_triton).
"""
from __future__ import annotations

import os

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ActQuantizer keeps its PyTorch code
    triton = None

__all__ = ["available", "fake_quantize_rows", "LAUNCH", "default_launch", "launch"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_COLUMNS = 16384  # one row in registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(x: torch.Tensor, columns: int) -> bool:
    """Whether the kernel can take x (rows of `columns` entries)."""
    return (triton is not None and (x.is_cuda or (INTERPRET and x.device.type == "cpu")) and x.dtype in _DTYPES
            and 0 < columns <= _MAX_COLUMNS and x.numel() > 0 and x.numel() % columns == 0)


if triton is not None:

    @triton.jit
    def grid_params(xmin, xmax, maxq, half, inv_div, SYM: tl.constexpr, GPTQ_SYM: tl.constexpr,
                    RECIP: tl.constexpr):
        """(scale, zero) of ranges [xmin, xmax] containing 0, as `common.quant.weight_grid.sym_grid_params` computes
        them (GPTQ_SYM: its "gptq" symmetric grid; inv_div = float32(1 / divisor) for RECIP, i.e. CUDA)."""
        if SYM:
            if GPTQ_SYM:  # [lo, amax], lo = -amax where xmin < 0 (else xmin); an all-zero range is [-1, 1]
                amax = tl.maximum(tl.abs(xmin), xmax)
                lo = tl.where(xmin < 0.0, -amax, xmin)
                dead = amax == 0.0
                lo = tl.where(dead, -1.0, lo)
                hi = tl.where(dead, 1.0, amax)
                if RECIP:
                    scale = (hi - lo) * inv_div
                else:
                    scale = tl.math.div_rn(hi - lo, maxq)
            else:
                amax = tl.maximum(tl.maximum(tl.abs(xmin), xmax), 1e-5)
                if RECIP:
                    scale = amax * inv_div
                else:
                    scale = tl.math.div_rn(amax, half - 1.0)
            zero = tl.zeros_like(scale) + half
        else:
            dead = (xmin == 0.0) & (xmax == 0.0)
            xmin = tl.where(dead, -1.0, xmin)
            xmax = tl.where(dead, 1.0, xmax)
            if RECIP:
                scale = (xmax - xmin) * inv_div
            else:
                scale = tl.math.div_rn(xmax - xmin, maxq)
            t = tl.math.div_rn(-xmin, scale)
            zero = (t + 12582912.0) - 12582912.0  # round half to even (|t| < 2^22)
        return scale, zero

    @triton.jit
    def _fake_quant_rows(X, Y, rows, cols, clip, maxq, half, inv_div, SYM: tl.constexpr, RECIP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        mask = rmask[:, None] & (c[None, :] < cols)
        offs = r.to(tl.int64)[:, None] * cols + c[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xmin = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=1), 0.0) * clip
        xmax = tl.maximum(tl.max(tl.where(mask, x, -float("inf")), axis=1), 0.0) * clip
        scale, zero = grid_params(xmin, xmax, maxq, half, inv_div, SYM, False, RECIP)
        t = tl.math.div_rn(x, scale[:, None])
        t = (t + 12582912.0) - 12582912.0  # |x / s| <= maxq / clip: far below 2^22
        q = tl.minimum(tl.maximum(t + zero[:, None], 0.0), maxq)
        y = scale[:, None] * (q - zero[:, None])
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _fake_quant_chunks(X, Y, cols, clip, maxq, half, inv_div, SYM: tl.constexpr, RECIP: tl.constexpr,
                           CHUNK: tl.constexpr):
        """One row per program, read in chunks of CHUNK entries twice: min / max over the row, then quantize (the
        second read mostly from L2); the same arithmetic as _fake_quant_rows."""
        row = tl.program_id(0).to(tl.int64) * cols
        lo = tl.full([CHUNK], float("inf"), tl.float32)
        hi = tl.full([CHUNK], -float("inf"), tl.float32)
        for c0 in range(0, cols, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            x = tl.load(X + row + c, mask=c < cols, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.where(c < cols, x, float("inf")))
            hi = tl.maximum(hi, tl.where(c < cols, x, -float("inf")))
        xmin = tl.minimum(tl.min(lo, axis=0), 0.0) * clip
        xmax = tl.maximum(tl.max(hi, axis=0), 0.0) * clip
        scale, zero = grid_params(xmin, xmax, maxq, half, inv_div, SYM, False, RECIP)
        for c0 in range(0, cols, CHUNK):
            c = c0 + tl.arange(0, CHUNK)
            x = tl.load(X + row + c, mask=c < cols, other=0.0).to(tl.float32)
            t = tl.math.div_rn(x, scale)
            t = (t + 12582912.0) - 12582912.0
            q = tl.minimum(tl.maximum(t + zero, 0.0), maxq)
            tl.store(Y + row + c, (scale * (q - zero)).to(Y.dtype.element_ty), mask=c < cols)


# Launch configuration by row width (`columns`): ("rows", R, warps) holds R whole rows per program in registers
# (_fake_quant_rows), ("chunks", C, warps) one row per program in chunks of C (_fake_quant_chunks).  Widths not
# listed take `default_launch`.  Both give the same output bit for bit.
LAUNCH: dict[int, tuple[str, int, int]] = {}


def default_launch(columns: int) -> tuple[str, int, int]:
    block_c = triton.next_power_of_2(columns)
    return "rows", max(1, min(64, 2048 // block_c)), 8 if block_c >= 4096 else 4


def launch(x: torch.Tensor, y: torch.Tensor, columns: int, bits: int, sym: bool, clip_ratio: float,
           config: tuple[str, int, int]) -> None:
    """Run the kernel of `config` (see LAUNCH) on x (contiguous, rows of `columns`) into y."""
    kind, size, warps = config
    rows = x.numel() // columns
    divisor = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    inv_div = float(np.float32(1.0) / np.float32(divisor))  # PyTorch CUDA: x / scalar = x * (1 / scalar), float32
    args = (float(clip_ratio), float(2**bits - 1), float(2 ** (bits - 1)), inv_div)
    if kind == "chunks":
        _fake_quant_chunks[(rows,)](x, y, columns, *args, SYM=sym, RECIP=x.is_cuda, CHUNK=size, num_warps=warps)
    elif kind == "rows":
        _fake_quant_rows[(triton.cdiv(rows, size),)](x, y, rows, columns, *args, SYM=sym, RECIP=x.is_cuda,
                                                     BLOCK_R=size, BLOCK_C=triton.next_power_of_2(columns),
                                                     num_warps=warps)
    else:
        raise ValueError(f"unknown launch kind {kind!r}")


def fake_quantize_rows(x: torch.Tensor, columns: int, bits: int, sym: bool, clip_ratio: float) -> torch.Tensor:
    """x (any shape, numel a multiple of `columns`) fake-quantized per row of `columns` consecutive entries;
    same dtype and shape as x.  Call only where `available(x, columns)`."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    launch(xc, y, columns, bits, sym, clip_ratio, LAUNCH.get(columns) or default_launch(columns))
    return y.view(x.shape)
