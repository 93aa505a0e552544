"""The fast blocked GPTQ / GPTAQ solver (backends "torch" and "triton"): the published layer loop, reorganised.

In processing order with H_d^-1 = U^T U (U upper), GPTQ rounds column i and updates   W[:, i:] -= err_i U[i, i:],
err_i = (w_i - q_i) / U_ii; GPTAQ adds + w_i P[i, i:] inside a lazy block and + Q_blk P[blk, rest] after it, with
P = alpha triu_1(dXXT U^T) U.  `common.solver.reference` is the same math as the published loop; this module gets
the same codes (float rounding aside) with fewer, larger kernels:
- the in-block column walk: one Triton kernel per block (common/solver/triton_walk.py) or `_walk_torch`, one
  rank-2 GEMM per column (err_i U[i, i:] - w_i P[i, i:] = [w, q] @ [U/U_ii - P; -U/U_ii]);
- GPTAQ's cross-block term in the M form (GPTAQConfig.form "m"): with M = alpha triu_1(dXXT U^T), P = M U is never
  formed; block J is walked from W[:, J] + c_J triu(U[J, J]), c_J = Q[:, :j1] M[:j1, J] (the walk's offset), and
  GPTQ's own trailing GEMM takes Err - c_J - Q_J M[J, J] in place of Err (n^3/3 + r n^2 extra work instead of the P
  form's 2n^3/3 + r n^2; form "p" applies P as published);
- GPTAQ's extra products on CUDA float32 in GPTAQConfig.precision (split TF32 by default, float32-level accuracy);
- group grids (SolverConfig.group_fit): "block_start" fits every group of a lazy block on the block's columns as
  they stand when it starts (the published rule; in the M form that value is W[:, J] + c_J triu(U[J, J])),
  "updated" fits each group on its columns as updated by every earlier column, the block's included; a group size
  that does not divide the columns leaves a narrower last group (in the last lazy block), as in the published loop.
Variants: "exact" runs GPTQ on V = W + alpha W dXXT H_d^-1; "p_term_only" keeps diag(U) and P only (no error
feedback).  Arithmetic is float32, or float64 for a float64 W; results come back in W's column order.
"""
from __future__ import annotations

import torch

from common.solver import tf32
from common.solver.config import NO_QUANT_BITS, SolverConfig
from common.solver.linalg import (addmm, asym_cross, asym_matrix, inverse_cholesky, lazy_blocksize, mm_upper,
                                  processing_order)
from common.solver.result import QuantResult, pack_result

__all__ = ["solve", "MAX_WALK"]

MAX_WALK = 128  # most columns one column walk (kernel launch) covers


class _CrossTerm:
    """GPTAQ's cross-block term in the M form, for lazy blocks of `lazy` columns (processing order).

    Block J (columns j1..j2) is walked with the offset c_J = Q[:, :j1] M[:j1, J] (`before`): the walk starts from
    W[:, J] + c_J triu(U[J, J]) and returns Err - c_J; `after` then subtracts Q_J M[J, J], so the trailing GEMM uses
    Err - G, G = c_J + Q_J M[J, J]; the walk's in-block term is P[J, J] = M[J, J] U[J, J].
    In mode "split" c_J comes from TF32 products against M = M_hi + M_lo, stored block-interleaved as MM[:, J] =
    [M_hi[:, J] | M_lo[:, J]] so one GEMM does both halves: with one grid per row (per-channel scale s) the rounded
    columns are kept as integer steps Q / s (exact in TF32; the walk writes them, `steps`) and
    c_J = s (steps M_hi + steps M_lo), two products; otherwise as Q = Q_hi + Q_lo and c_J adds Q_lo M_hi, three
    products.  "float32" and "tf32": one product Q M.
    row_scale [rows, 1]: the per-channel scale s (None: no single grid per row); only the split mode uses it.
    """

    def __init__(self, M: torch.Tensor, U: torch.Tensor, Q: torch.Tensor, lazy: int, mode: str,
                 row_scale: torch.Tensor | None):
        n = M.shape[0]
        self.Q, self.lazy, self.mode = Q, lazy, mode
        nb = -(-n // lazy)
        pad = nb * lazy - n  # a narrower last block: zero rows and columns make every block `lazy` wide
        Mp = torch.nn.functional.pad(M, (0, pad, 0, pad)) if pad else M
        Up = torch.nn.functional.pad(U, (0, pad, 0, pad)) if pad else U

        def diag_blocks(X: torch.Tensor) -> torch.Tensor:  # [nb, lazy, lazy]: X[J, J] for every block J
            return X.view(nb, lazy, nb, lazy).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

        self.M_diag = diag_blocks(Mp).contiguous()
        self.P_diag = torch.bmm(self.M_diag, diag_blocks(Up))
        del Up
        self.scale = row_scale if mode == "split" else None
        if mode != "split":
            self.M = M
            return
        # MM[:, J] = [M_hi[:, J] | M_lo[:, J]], built as [n, nb, 2, lazy]
        self.MM = torch.empty(n, nb, 2, lazy, dtype=M.dtype, device=M.device)
        tf32.split_into(Mp[:n].view(n, nb, lazy), self.MM[:, :, 0], self.MM[:, :, 1])
        del Mp
        self.MM = self.MM.view(n, nb, 2 * lazy)
        self.a = torch.empty_like(Q)  # integer steps, or Q_hi
        self.b = None if self.scale is not None else torch.empty_like(Q)  # Q_lo

    def before(self, j1: int, j2: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """The walk's offset for the block starting at j1, as (C1, C2, s) with c_J = (C1 + C2) s (C2, s may be None;
        see the walks); None for the first block."""
        if j1 == 0:
            return None
        if self.mode != "split":
            with tf32.tf32(self.mode == "tf32"):
                return self.Q[:, :j1] @ self.M[:j1, j1:j2], None, None
        n1, lazy = j2 - j1, self.lazy
        MM = self.MM[:j1, j1 // lazy]  # [j1, 2 lazy]: M_hi | M_lo of block J's columns
        with tf32.tf32():
            out = self.a[:, :j1] @ MM
            if self.scale is None:
                out[:, :n1].addmm_(self.b[:, :j1], MM[:, :n1])
        return out[:, :n1], out[:, lazy:lazy + n1], self.scale

    def steps(self, s1: int, s2: int) -> torch.Tensor | None:
        """Where the walk of columns s1..s2 writes q / s (per-channel split mode), else None."""
        return self.a[:, s1:s2] if self.scale is not None else None

    def after(self, j1: int, j2: int, err: torch.Tensor) -> None:
        """Turn the walk's err - c_J [rows, n1] into Err - G for the trailing GEMM; record Q[:, J]'s split parts."""
        q = self.Q[:, j1:j2]
        n1 = j2 - j1
        err.addmm_(q, self.M_diag[j1 // self.lazy, :n1, :n1], alpha=-1)
        if self.mode == "split" and self.scale is None:
            tf32.split_into(q, self.a[:, j1:j2], self.b[:, j1:j2])


def _walk_torch(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor | None, S1: torch.Tensor | None,
                Z1: torch.Tensor | None, maxq: int, E1: torch.Tensor, Q1: torch.Tensor,
                C: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
                K1: torch.Tensor | None = None) -> None:
    """The in-block column walk in PyTorch (the twin of common/solver/triton_walk.py's kernel, same arguments).

    W1 [rows, n] holds the block's current columns and gets their values before rounding; E1 gets err = (w - q)/U_ii
    (less the offset) and Q1 gets q.  S1, Z1 [rows, n] are each column's grid (None: no rounding).  The offset
    C = (C1, C2, cs), c = (C1 + C2) * cs (C2, cs may be None), walks the block as if it started from W1 + c triu(U1):
    column i reads w = W1[:, i] + c_i U_ii and its error goes on as err - c_i.  K1 (optional) gets q / s.
    Per column the update is one GEMM with inner dimension 2 (3 with an offset):
    W1[:, i:] -= [w, q, c_i] @ [B[i, i:] - P[i, i:]; -B[i, i:]; -U[i, i:]] = (err - c_i) U[i, i:] - w P[i, i:],
    B = U / diag(U) row-wise, so GPTAQ costs the same per column as GPTQ.
    """
    rows, n = W1.shape
    d = torch.diagonal(U1)
    B = U1 / d.unsqueeze(1)
    rules = [B if P1 is None else B - P1, -B]
    off = _offset_value(C)
    if off is not None:
        rules.append(-U1)
    coef = torch.stack(rules, dim=1)  # [n, 2 or 3, n]
    T = W1.clone()
    WQ = torch.empty(rows, n, len(rules), dtype=W1.dtype, device=W1.device)  # w, q (and c) of each column
    if off is not None:
        WQ[:, :, 2] = off
    for i in range(n):
        w, q = WQ[:, i, 0], WQ[:, i, 1]
        w.copy_(T[:, i])
        if off is not None:
            w.add_(off[:, i] * d[i])
        if S1 is None:
            q.copy_(w)
        else:
            s, z = S1[:, i], Z1[:, i]
            torch.mul(s, torch.clamp(torch.round(w / s) + z, 0, maxq) - z, out=q)
        T[:, i:].addmm_(WQ[:, i, :], coef[i, :, i:], alpha=-1)
    W1.copy_(WQ[:, :, 0])
    E1.copy_((WQ[:, :, 0] - WQ[:, :, 1]) / d)
    if off is not None:
        E1.sub_(off)
    Q1.copy_(WQ[:, :, 1])
    if K1 is not None:
        torch.round(WQ[:, :, 1] / S1, out=K1)


def _column_grids(scales: torch.Tensor, zeros: torch.Tensor, g_pos: torch.Tensor, g_list: list[int], s1: int,
                  s2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's (scale, zero) for positions s1..s2-1 as [rows, n]: a broadcast view when one group covers them."""
    g = g_list[s1]
    if all(v == g for v in g_list[s1:s2]):
        shape = (scales.shape[0], s2 - s1)
        return scales[:, g:g + 1].expand(shape), zeros[:, g:g + 1].expand(shape)
    idx = g_pos[s1:s2]
    return scales[:, idx], zeros[:, idx]


def _offset_columns(C: tuple | None, e1: int, e2: int) -> tuple | None:
    """Columns e1..e2 of a walk offset C = (C1, C2, s) (see `_walk_torch`; None stays None)."""
    if C is None:
        return None
    C1, C2, s = C
    return C1[:, e1:e2], None if C2 is None else C2[:, e1:e2], s


def _offset_value(C: tuple | None) -> torch.Tensor | None:
    """The offset c = (C1 + C2) s that C = (C1, C2, s) stands for (C2 and s may be None; None stays None)."""
    if C is None:
        return None
    C1, C2, s = C
    c = C1 if C2 is None else C1 + C2
    return c if s is None else c * s


def _walk_width(lazy: int, group_size: int, fit_between_walks: bool, max_walk: int) -> int:
    """Columns per column walk (one kernel launch): the largest divisor of the lazy block width that is at most
    max_walk, and of the group size when grids are fitted between walks ("updated"), so every group starts a walk."""
    span = group_size if fit_between_walks else lazy
    return max(d for d in range(1, min(span, max_walk) + 1) if span % d == 0)


def _asym_mode(W: torch.Tensor, precision: str) -> str:
    """The precision of GPTAQ's extra products: GPTAQConfig.precision on CUDA float32, plain products otherwise."""
    return precision if W.is_cuda and W.dtype == torch.float32 else "float32"


def solve(name: str, W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, cfg: SolverConfig, backend: str,
          *, panel: int | None = None, max_walk: int = MAX_WALK) -> QuantResult:
    """GPTQ (dXXT None) or GPTAQ (cfg.gptaq) of W [rows, cols]; backend "torch" or "triton" (the column walk).

    Inputs are checked by the caller (common.solver.api).  panel (triangular products) and max_walk (columns per
    walk) are tuning knobs; the tests set them small to exercise several panels and walks per block.
    """
    if backend == "triton":
        from common.solver.triton_walk import walk
    else:
        walk = _walk_torch
    dev = W.device
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, cols = W.shape
    gs, bits = cfg.group_size, cfg.bits
    W = W.to(dtype).clone()
    H = H.to(dev, dtype)
    if dXXT is not None:
        dXXT = dXXT.to(dev, dtype)
    dead = torch.diag(H) == 0
    if dead.any():
        H = H.clone()
        H[dead, dead] = 1
        W[:, dead] = 0
        if dXXT is not None:
            dXXT = dXXT.clone()
            dXXT[:, dead] = 0

    perm = processing_order(H, cfg.act_order, cfg.order)
    permuted = cfg.act_order or cfg.order == "reverse"  # else the processing order is the identity: skip the gathers
    U = inverse_cholesky(H[perm][:, perm] if permuted else H, cfg.percdamp, name, panel)
    if permuted:
        W = W[:, perm]
    P = M = None
    g = cfg.gptaq
    mode = _asym_mode(W, g.precision)
    if dXXT is not None:
        D = dXXT[perm][:, perm] if permuted else dXXT
        del dXXT
        with tf32.tf32(mode != "float32"):
            if g.variant == "exact":
                # V = W + alpha W dXXT H^-1: the least-squares target of min ||Q X~ - W X||; GPTQ on V is the exact
                # greedy.  In processing order H^-1 = U^T U.
                # Formed once, in plain float32 unless plain TF32 was asked for (see GPTAQ_PRECISIONS).
                v_mode = "tf32" if mode == "tf32" else "float32"
                with tf32.tf32(v_mode == "tf32"):
                    WD = addmm(v_mode, torch.zeros_like(W), W, D)
                    W += g.alpha * mm_upper(mm_upper(WD, U, transpose=True, mode=v_mode, panel=panel), U,
                                            transpose=False, mode=v_mode, panel=panel)
                del WD
            elif g.variant == "p_term_only" or g.form == "p":
                P = asym_matrix(D, U, g.alpha, mode=mode, panel=panel)
            else:
                M = asym_cross(D, U, g.alpha, mode=mode, panel=panel)
            if g.variant == "p_term_only":  # no error feedback: updates use only U's diagonal (err = (w - q) / U_ii)
                U = torch.diag(torch.diagonal(U))
        del D

    quantize = bits != NO_QUANT_BITS
    ngroups = cfg.num_groups(cols)  # where gs does not divide cols the last group is narrower (slices stop at cols)
    dynamic = quantize and gs != -1 and not cfg.static_groups  # group grids fitted during the solve
    fit_between_walks = dynamic and cfg.group_fit == "updated"
    scales = zeros = g_pos = g_list = None

    def fit_group(k: int, Wg: torch.Tensor) -> None:
        scales[:, k:k + 1], zeros[:, k:k + 1] = cfg.fit_grid(Wg)

    if quantize:
        scales = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        zeros = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        pos = torch.arange(cols, device=dev)
        g_pos = pos // gs if gs != -1 else torch.zeros_like(pos)  # group of each position
        if gs != -1 and cfg.static_groups:  # all grids up-front, on the original columns
            g_pos = perm // gs
            W_orig = W[:, torch.argsort(perm)]
            for k in range(ngroups):
                fit_group(k, W_orig[:, k * gs:(k + 1) * gs])
            del W_orig
        elif gs == -1:
            scales[:], zeros[:] = cfg.fit_grid(W)
        g_list = g_pos.tolist()

    # Lazy blocks of `lazy` columns, walked `width` columns at a time (a kernel launch for the Triton backend).
    # Inside a lazy block the P term uses each column before rounding; later blocks get the rounded Q:
    #   P form:  W[:, rest] -= Err U[blk, rest] - Q P[blk, rest].
    #   M form (P = M U never formed): block J is walked from W[:, J] + c_J triu(U[J, J]), c_J = Q[:, :j1] M[:j1, J]
    #            (the walk's offset), and W[:, rest] -= (Err - G) U[blk, rest] with G = c_J + Q_J M[J, J], inside
    #            GPTQ's own GEMM.
    #   (Both give W[:, j] += sum_{i < j1} q_i P[i, j]: split P[i, j] = sum_{i<k<=j} M[i, k] U[k, j] at k = j1.)
    lazy = lazy_blocksize(cfg.blocksize, gs)
    width = _walk_width(lazy, gs, fit_between_walks, max_walk)
    maxq = 2**bits - 1
    Q = torch.empty_like(W)
    cross = None
    if M is not None:
        # split mode: per-channel codes are exact in TF32 (see _CrossTerm)
        per_channel = mode == "split" and quantize and gs == -1 and bool((scales > 0).all())
        cross = _CrossTerm(M, U, Q, lazy, mode, scales[:, :1] if per_channel else None)
        M = None  # the split mode keeps only M's parts (cross.MM)
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        n1 = i2 - i1
        U_JJ = U[i1:i2, i1:i2]
        P_JJ = C = None
        if P is not None:
            P_JJ = P[i1:i2, i1:i2]
        elif cross is not None:
            P_JJ = cross.P_diag[i1 // lazy, :n1, :n1]
            C = cross.before(i1, i2)
        if dynamic and not fit_between_walks:  # "block_start": every group of the block, on W as the block starts
            W_J = W[:, i1:i2] if C is None else W[:, i1:i2] + _offset_value(C) @ U_JJ  # M form: + c_J triu(U[J, J])
            for g1 in range(0, n1, gs):
                fit_group(g_list[i1 + g1], W_J[:, g1:g1 + gs])
            del W_J
        E = torch.empty(rows, n1, dtype=dtype, device=dev)  # this lazy block's err (less the offset c_J)
        for s1 in range(i1, i2, width):
            s2 = min(s1 + width, i2)
            e1, e2 = s1 - i1, s2 - i1
            S1 = Z1 = None
            if quantize:
                if fit_between_walks and s1 % gs == 0:  # "updated": on the group's current (updated) weights,
                    Wg = W[:, s1:s1 + gs]
                    if C is not None:  # which include the group's share of the walk offset, c_grp triu(U[grp, grp])
                        Wg = Wg + _offset_value(_offset_columns(C, e1, e1 + gs)) @ U_JJ[e1:e1 + gs, e1:e1 + gs]
                    fit_group(g_list[s1], Wg)
                S1, Z1 = _column_grids(scales, zeros, g_pos, g_list, s1, s2)
            walk(W[:, s1:s2], U_JJ[e1:e2, e1:e2], None if P_JJ is None else P_JJ[e1:e2, e1:e2], S1, Z1, maxq,
                 E[:, e1:e2], Q[:, s1:s2], _offset_columns(C, e1, e2), None if cross is None else cross.steps(s1, s2))
            if s2 < i2:  # rest of the lazy block: the in-block rule (P term on the columns before rounding)
                W[:, s2:i2].addmm_(E[:, e1:e2], U_JJ[e1:e2, e2:], alpha=-1)
                if P_JJ is not None:
                    W[:, s2:i2].addmm_(W[:, s1:s2], P_JJ[e1:e2, e2:])
        if cross is not None:
            cross.after(i1, i2, E)  # Err - G
        if i2 < cols:
            W[:, i2:].addmm_(E, U[i1:i2, i2:], alpha=-1)
            if P is not None:
                with tf32.tf32(mode != "float32"):
                    addmm(mode, W[:, i2:], Q[:, i1:i2], P[i1:i2, i2:])
    # W now holds every column's value before rounding (kept to count clipping).
    return pack_result(name, cfg, Q, W, scales, zeros, g_pos, perm, {"backend": backend})
