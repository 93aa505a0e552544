"""Fused in-block column walk of GPTQ / GPTAQ: one Triton kernel walks all columns of a block.

Rows of W are independent problems that share U (upper Cholesky factor of H^-1) and P = alpha triu_1(dXXT U^T) U
(none for GPTQ and GPTAQ exact).  For the block's columns i = 0..n-1 in processing order, each row does
    w   = W[:, i]                                    (recorded: the column before rounding)
    q   = s (clamp(round(w / s) + z, 0, maxq) - z)   (its grid (s, z); q = w without rounding)
    err = (w - q) / U_ii
    W[:, i:] -= err U[i, i:] - w P[i, i:]
A program keeps a tile of BLOCK_M rows x the block's columns in registers (finished columns hold q, a second tile
the values w) and reads the block's rows of U and P from cache one step ahead, so the whole walk is one launch
instead of a few small kernels per column.  At the end it writes w back into W, err and -q into the caller's
buffers; the trailing columns then get one GEMM per block in PyTorch
(`common.solvers._solve`: W[:, rest] -= [Err, -Q] @ [U[blk, rest]; P[blk, rest]]).  Arithmetic is float32,
division is IEEE (div_rn) and rounding is half to even, as in torch.round, so codes match the PyTorch walk
(`common.solvers._walk_torch`) except where float summation order tips a value across a rounding boundary.
Under TRITON_INTERPRET=1 the same kernel runs on CPU tensors (used by the tests).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # CPU-only installs: the solvers fall back to the PyTorch walk
    triton = None
    _IMPORT_ERROR = str(e)

__all__ = ["walk", "unavailable_reason", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M, NUM_WARPS = 4, 1  # rows per program, one warp: the column axis stays in a warp (no barrier per step)


def unavailable_reason(W: torch.Tensor) -> str | None:
    """Why the Triton walk cannot take W (None when it can)."""
    if triton is None:
        return f"needs triton, which is not importable ({_IMPORT_ERROR})"
    if not (W.is_cuda or (INTERPRET and W.device.type == "cpu")):
        return f"needs a CUDA tensor (W is on {W.device.type}; TRITON_INTERPRET=1 runs it on CPU)"
    if W.dtype == torch.float64:
        return "computes in float32; got a float64 W (use backend='torch')"
    return None


if triton is not None:

    @triton.jit
    def _walk_kernel(W, sw, E, se, NQ, snq, U, su, P, sp, S, ssr, ssc, Z, szr, szc, rows, n, maxq,
                     HAS_P: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K]: rows of U and P load in the tile's own layout
        rmask = r < rows
        cmask = c < n
        r = r.to(tl.int64)
        mask = rmask[:, None] & cmask
        tile = tl.load(W + r[:, None] * sw + c, mask=mask, other=0.0)  # finished columns hold q
        wpre = tl.zeros_like(tile)  # each column's value before rounding
        # column i's operands (U row, U_ii, P row, grid) are loaded one step ahead, off the dependency chain
        d = tl.load(U)
        u = tl.load(U + c, mask=cmask, other=0.0)
        p = tl.load(P + c, mask=cmask & HAS_P, other=0.0)
        s = tl.load(S + r * ssr, mask=rmask & QUANT, other=1.0)
        z = tl.load(Z + r * szr, mask=rmask & QUANT, other=0.0)
        for i in range(n):
            j = tl.minimum(i + 1, n - 1)
            d_next = tl.load(U + j * su + j)
            u_next = tl.load(U + j * su + c, mask=cmask, other=0.0)
            p_next = tl.load(P + j * sp + c, mask=cmask & HAS_P, other=0.0)
            s_next = tl.load(S + r * ssr + j * ssc, mask=rmask & QUANT, other=1.0)
            z_next = tl.load(Z + r * szr + j * szc, mask=rmask & QUANT, other=0.0)
            col = c == i
            w = tl.sum(tl.where(col, tile, 0.0), axis=1)
            if QUANT:
                t = tl.math.div_rn(w, s)
                # round half to even: (t + 1.5 * 2^23) - 1.5 * 2^23 is exact for |t| < 2^22, larger |t| is clamped
                t = (t + 12582912.0) - 12582912.0
                q = s * (tl.minimum(tl.maximum(t + z, 0.0), maxq) - z)
            else:
                q = w
            err = tl.math.div_rn(w - q, d)
            later = c > i
            upd = err[:, None] * tl.where(later, u, 0.0)
            if HAS_P:
                upd -= w[:, None] * tl.where(later, p, 0.0)
            tile = tl.where(col, q[:, None], tile - upd)
            wpre = tl.where(col, w[:, None], wpre)
            d, u, p, s, z = d_next, u_next, p_next, s_next, z_next
        diag = tl.load(U + c * (su + 1), mask=cmask, other=1.0)
        tl.store(W + r[:, None] * sw + c, wpre, mask=mask)
        tl.store(E + r[:, None] * se + c, tl.math.div_rn(wpre - tile, diag), mask=mask)  # = each step's err
        tl.store(NQ + r[:, None] * snq + c, -tile, mask=mask)


def walk(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor | None, S1: torch.Tensor | None,
         Z1: torch.Tensor | None, maxq: int, E1: torch.Tensor, NQ1: torch.Tensor) -> None:
    """The column walk of one block, in place; same contract as `common.solvers._walk_torch`.

    W1 [rows, n]: the block's current columns (a view of W), overwritten with each column before rounding;
    U1, P1 [n, n]: the block's diagonal blocks of U and P (P1 None: GPTQ); S1, Z1 [rows, n]: each column's grid
    (None: no rounding; broadcast views are fine); E1, NQ1 [rows, n] get err and -q.  All float32, unit column stride.
    """
    rows, n = W1.shape
    for t in (W1, U1, E1, NQ1) + (() if P1 is None else (P1,)):
        if t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError(f"fused walk: float32 blocks with unit column stride expected, got {t.dtype} "
                             f"with strides {t.stride()}")
    quant = S1 is not None
    S, Z = (S1, Z1) if quant else (W1, W1)
    P = U1 if P1 is None else P1
    _walk_kernel[(triton.cdiv(rows, BLOCK_M),)](
        W1, W1.stride(0), E1, E1.stride(0), NQ1, NQ1.stride(0), U1, U1.stride(0), P, P.stride(0),
        S, S.stride(0), S.stride(1), Z, Z.stride(0), Z.stride(1), rows, n, float(maxq),
        HAS_P=P1 is not None, QUANT=quant, BLOCK_M=BLOCK_M, BLOCK_K=max(16, triton.next_power_of_2(n)),
        num_warps=NUM_WARPS)
