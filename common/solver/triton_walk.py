"""Fused in-block column walk of GPTQ / GPTAQ: one Triton kernel walks all columns of a block.

Rows of W are independent problems that share U (upper Cholesky factor of H^-1) and P = alpha triu_1(dXXT U^T) U
(its diagonal block; none for GPTQ and GPTAQ exact).  For the block's columns i = 0..n-1 in processing order, each row does
    w   = W[:, i] + c_i U_ii                         (recorded: the column before rounding)
    q   = s (clamp(round(w / s) + z, 0, maxq) - z)   (its grid (s, z); q = w without rounding)
    err = (w - q) / U_ii - c_i
    W[:, i:] -= err U[i, i:] - w P[i, i:]
with an optional offset c (GPTAQ's M form: c_J = Q[:, :j1] M[:j1, J]), which walks the block as if it started from
W + c triu(U) and hands back err - c, ready for the trailing GEMM; without it c = 0.  (The tile starts as
W + c U_ii column by column and step i adds c_i U[i, later], work off the step-to-step dependency chain.)
A program keeps a tile of BLOCK_M rows x the block's columns in registers (finished columns hold q, a second tile
the values w) and reads the block's rows of U and P and the grids one step ahead, so the whole walk is one launch
instead of a few small kernels per column.  At the end it writes w back into W, err and q into the
caller's buffers (and q / s, the integer steps, when asked); the trailing columns then get one GEMM per block in
PyTorch (`common.solver.blocked.solve`).  Arithmetic is float32, division is IEEE (div_rn) and rounding is half to even, as
in torch.round, so codes match the PyTorch walk (`common.solver.blocked._walk_torch`) except where float summation order
tips a value across a rounding boundary.
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
    def _walk_kernel(W, sw, E, se, Qo, sq, U, su, P, sp, S, ssr, ssc, Z, szr, szc, C1, sc1, C2, sc2, CS, K, sk,
                     rows, n, maxq, HAS_P: tl.constexpr, QUANT: tl.constexpr, HAS_C: tl.constexpr,
                     HAS_C2: tl.constexpr, HAS_CS: tl.constexpr, HAS_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K]: rows of U and P load in the tile's own layout
        rmask = r < rows
        cmask = c < n
        r = r.to(tl.int64)
        mask = rmask[:, None] & cmask
        tile = tl.load(W + r[:, None] * sw + c, mask=mask, other=0.0)  # finished columns hold q
        wpre = tl.zeros_like(tile)  # each column's value before rounding
        cs = tl.load(CS + r, mask=rmask & HAS_CS, other=1.0)  # the offset's row scale
        offs = (tl.load(C1 + r[:, None] * sc1 + c, mask=mask & HAS_C, other=0.0)
                + tl.load(C2 + r[:, None] * sc2 + c, mask=mask & HAS_C2, other=0.0)) * cs[:, None]
        diag = tl.load(U + c * (su + 1), mask=cmask, other=1.0)
        if HAS_C:  # the tile starts as W + c U_ii (per column); column i's c_i U[i, later] is added at step i
            tile += offs * diag
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
            later = c > i
            w = tl.sum(tl.where(col, tile, 0.0), axis=1)
            if HAS_C:  # off the dependency chain: offs is fixed
                tile += tl.sum(tl.where(col, offs, 0.0), axis=1)[:, None] * tl.where(later, u, 0.0)
            if QUANT:
                t = tl.math.div_rn(w, s)
                # round half to even: (t + 1.5 * 2^23) - 1.5 * 2^23 is exact for |t| < 2^22, larger |t| is clamped
                t = (t + 12582912.0) - 12582912.0
                q = s * (tl.minimum(tl.maximum(t + z, 0.0), maxq) - z)
            else:
                q = w
            err = tl.math.div_rn(w - q, d)
            upd = err[:, None] * tl.where(later, u, 0.0)
            if HAS_P:
                upd -= w[:, None] * tl.where(later, p, 0.0)
            tile = tl.where(col, q[:, None], tile - upd)
            wpre = tl.where(col, w[:, None], wpre)
            d, u, p, s, z = d_next, u_next, p_next, s_next, z_next
        err = tl.math.div_rn(wpre - tile, diag) - offs  # = each step's err, less the offset
        tl.store(W + r[:, None] * sw + c, wpre, mask=mask)
        tl.store(E + r[:, None] * se + c, err, mask=mask)
        tl.store(Qo + r[:, None] * sq + c, tile, mask=mask)
        if HAS_K:  # integer steps q / s (exact: q = s k)
            t = tl.math.div_rn(tile, tl.load(S + r[:, None] * ssr + c * ssc, mask=mask, other=1.0))
            tl.store(K + r[:, None] * sk + c, (t + 12582912.0) - 12582912.0, mask=mask)


def walk(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor | None, S1: torch.Tensor | None,
         Z1: torch.Tensor | None, maxq: int, E1: torch.Tensor, Q1: torch.Tensor,
         C: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
         K1: torch.Tensor | None = None) -> None:
    """The column walk of one block, in place; same contract as `common.solver.blocked._walk_torch`.

    W1 [rows, n]: the block's current columns (a view of W), overwritten with each column before rounding;
    U1, P1 [n, n]: the block's diagonal blocks of U and P (P1 None: GPTQ); S1, Z1 [rows, n]: each column's grid
    (None: no rounding; broadcast views are fine); E1, Q1 [rows, n] get err and q.  C = (C1, C2, cs): the offset
    c = (C1 + C2) * cs (C2, cs [rows, 1] may be None) walked in as W1 + c triu(U1), with E1 = err - c;
    K1 [rows, n] gets q / s (integer steps; needs S1).  All float32, unit column stride.
    """
    rows, n = W1.shape
    C1, C2, CS = C if C is not None else (None, None, None)
    for t in (W1, U1, E1, Q1, P1, C1, C2, K1):
        if t is not None and (t.dtype != torch.float32 or t.stride(1) != 1):
            raise ValueError(f"fused walk: float32 blocks with unit column stride expected, got {t.dtype} "
                             f"with strides {t.stride()}")
    if CS is not None and (CS.dtype != torch.float32 or CS.shape != (rows, 1) or CS.stride(0) != 1):
        raise ValueError(f"fused walk: the offset's row scale must be a contiguous float32 [{rows}, 1] tensor")
    quant = S1 is not None
    if K1 is not None and not quant:
        raise ValueError("fused walk: integer steps K1 need a grid S1")
    S, Z = (S1, Z1) if quant else (W1, W1)
    P = U1 if P1 is None else P1
    A1 = W1 if C1 is None else C1
    A2 = A1 if C2 is None else C2
    _walk_kernel[(triton.cdiv(rows, BLOCK_M),)](
        W1, W1.stride(0), E1, E1.stride(0), Q1, Q1.stride(0), U1, U1.stride(0), P, P.stride(0),
        S, S.stride(0), S.stride(1), Z, Z.stride(0), Z.stride(1), A1, A1.stride(0), A2, A2.stride(0),
        W1 if CS is None else CS, W1 if K1 is None else K1, 0 if K1 is None else K1.stride(0), rows, n, float(maxq),
        HAS_P=P1 is not None, QUANT=quant, HAS_C=C1 is not None, HAS_C2=C2 is not None, HAS_CS=CS is not None,
        HAS_K=K1 is not None, BLOCK_M=BLOCK_M, BLOCK_K=max(16, triton.next_power_of_2(n)), num_warps=NUM_WARPS)
