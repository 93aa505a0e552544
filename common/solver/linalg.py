"""The solvers' linear algebra, in processing order: H_d^-1 = U^T U with U upper triangular (H_d = H + damp I), and
GPTAQ's M = alpha triu_1(dXXT U^T), P = M U; triangular products skip U's zero blocks.

Also the column layout every backend shares: the processing order (act-order, reverse) and the lazy block width.
Products run in a precision `mode` (GPTAQConfig.precision on CUDA float32, else "float32"): "float32" and "tf32" one
product, "split" three TF32 products of hi/lo halves (common.solver.tf32).
"""
from __future__ import annotations

import logging

import torch

from common.solver import tf32
from common.solver.result import SolverError

__all__ = ["inverse_cholesky", "upper_inverse", "mm_upper", "asym_cross", "asym_matrix", "addmm", "processing_order",
           "lazy_blocksize", "MAX_DAMP_RETRIES"]

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6  # a Hessian that stays non-positive-definite is retried with 10x the dampening, this often
PANEL = 2048  # panel width of the triangular products and the triangular inverse (measured best on an H100)
CPU_PANEL = 128  # the same on CPU, where smaller GEMMs lose little and skipping U's zero blocks pays (2.5x at n=1536)


def panel_width(n: int, device: torch.device) -> int:
    """Panel width of the triangular products below (large panels keep the GPU's GEMMs efficient)."""
    return min(n, PANEL if device.type == "cuda" else CPU_PANEL)


def upper_inverse(R: torch.Tensor, panel: int | None = None) -> torch.Tensor:
    """R^-1 for upper-triangular R, by column panels: R[:j2, :j2] X = I[:j2, j1:j2] (n^3/3 flops, not n^3)."""
    n = R.shape[0]
    b = panel or panel_width(n, R.device)
    Rinv = torch.zeros(n, n, dtype=R.dtype, device=R.device)
    for j1 in range(0, n, b):
        j2 = min(j1 + b, n)
        rhs = torch.zeros(j2, j2 - j1, dtype=R.dtype, device=R.device)
        rhs[j1:].fill_diagonal_(1.0)
        Rinv[:j2, j1:j2] = torch.linalg.solve_triangular(R[:j2, :j2], rhs, upper=True)
    return Rinv


def inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer", panel: int | None = None) -> torch.Tensor:
    """U, upper triangular with H_damped^-1 = U^T U, H_damped = H + percdamp * mean(diag H) * I.

    The published code gets U as cholesky(cholesky_inverse(cholesky(H_d)), upper=True); here H^-1 is never formed:
    with J the reversal, J H_d J = L L^T gives H_d = R R^T, R = J L J upper triangular, and U = R^-1 (the unique
    upper factor with positive diagonal).  A Hessian that stays non-positive-definite is retried with 10x the
    dampening (logged), up to MAX_DAMP_RETRIES times.  H is not modified.
    """
    n = H.shape[0]
    mean_diag = torch.diag(H).mean()
    damp = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        Hd = H.flip(0, 1)
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            U = upper_inverse(L.flip(0, 1), panel)
            if torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Hessian was not positive definite; succeeded with percdamp=%g", name, damp)
                return U
        del L
        damp = max(damp * 10.0, 1e-6)
        log.warning("%s: Hessian not positive definite after dampening; retrying with percdamp=%g", name, damp)
    raise SolverError(f"{name}: Hessian is not positive definite even with percdamp={damp:g} ({n} columns)")


def addmm(mode: str, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c += alpha * a @ b in `mode` ("float32" and "tf32": one product; "split": three TF32 products).  TF32 itself
    is switched on around the call sites (`tf32.tf32(mode != "float32")`)."""
    if mode == "split":
        return tf32.addmm_split_(c, a, b, alpha)
    return c.addmm_(a, b, alpha=alpha)


def mm_upper(X: torch.Tensor, U: torch.Tensor, *, transpose: bool, mode: str, strict_upper_out: bool = False,
             panel: int | None = None) -> torch.Tensor:
    """X @ U^T (transpose) or X @ U for upper-triangular U, skipping U's zero blocks (half the dense flops).

    Column panel J of X U^T reads X[:, j1:]; of X U it reads X[:, :j2].  strict_upper_out (square X, X U^T only)
    computes just the rows i < j2 of panel J and returns triu_1(X U^T).  Products in `mode` (see `addmm`).
    """
    n = U.shape[0]
    b = panel or panel_width(n, X.device)
    out = torch.zeros(X.shape[0], n, dtype=X.dtype, device=X.device)
    for j1 in range(0, n, b):
        j2 = min(j1 + b, n)
        if transpose:
            rows = j2 if strict_upper_out else X.shape[0]
            addmm(mode, out[:rows, j1:j2], X[:rows, j1:], U[j1:j2, j1:].T)
        else:
            addmm(mode, out[:, j1:j2], X[:, :j2], U[:j2, j1:j2])
    return out.triu_(1) if strict_upper_out else out


def asym_cross(dXXT: torch.Tensor, U: torch.Tensor, alpha: float, *, mode: str,
               panel: int | None = None) -> torch.Tensor:
    """M = alpha * triu_1(dXXT U^T) (processing order), the factor of P = M U; only its strict upper part is formed
    (about n^3/3 flops).  Products in `mode` (see `addmm`)."""
    return mm_upper(dXXT, U, transpose=True, strict_upper_out=True, panel=panel, mode=mode).mul_(alpha)


def asym_matrix(dXXT: torch.Tensor, U: torch.Tensor, alpha: float, *, mode: str,
                panel: int | None = None) -> torch.Tensor:
    """GPTAQ's P = alpha * triu_1(dXXT U^T) U (processing order), computed tile by tile over the nonzero blocks.

    Both factors are triangular, so P[I, J] = M[I, I..J] U[I..J, J] with M = `asym_cross`: about 2n^3/3 flops
    against 4n^3 for the two dense products.  Products in `mode` (see `addmm`).
    """
    n = U.shape[0]
    b = panel or panel_width(n, U.device)
    M = asym_cross(dXXT, U, alpha, panel=b, mode=mode)
    P = torch.zeros_like(M)
    for i1 in range(0, n, b):
        i2 = min(i1 + b, n)
        for j1 in range(i1, n, b):
            j2 = min(j1 + b, n)
            addmm(mode, P[i1:i2, j1:j2], M[i1:i2, i1:j2], U[i1:j2, j1:j2])
    return P


def processing_order(H: torch.Tensor, act_order: bool, order: str) -> torch.Tensor:
    """perm: column perm[j] is quantized j-th.  act_order: by descending diag(H) (stable); order "reverse" flips it."""
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(H.shape[0], device=H.device)
    return perm.flip(0) if order == "reverse" else perm


def lazy_blocksize(blocksize: int, group_size: int) -> int:
    """The lazy block width: blocksize made a multiple of the group size (at least one group), so that every group
    lies inside one block (the published defaults, 128 and 128, already are)."""
    if group_size == -1:
        return blocksize
    return max(1, blocksize // group_size) * group_size
