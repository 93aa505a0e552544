"""GPTQ and GPTAQ layer solvers: the public function API.

GPTQ quantizes W column by column in a processing order and pushes each column's rounding error onto the
columns not yet quantized through U, the upper Cholesky factor of H^-1 (H^-1 = U^T U, H = (2/N) X~ X~^T):
    err_i = (w_i - q_i) / U_ii,        W[:, i:] -= err_i U[i, i:].
GPTAQ (GPTQv2) fits Q X~ to the full-precision output W X.  With dXXT = (2/N)(X - X~) X~^T and
P = alpha * triu_1(dXXT U^T) U it adds the asymmetric term at each step (published "P form"):
    W[:, i:] -= err_i U[i, i:] - w_i P[i, i:]        (w_i the column before rounding),
and across lazy blocks W[:, rest] -= Err U[blk, rest] - Q_blk P[blk, rest] (the block after its steps: its rounded Q).
By default (ASYM_FORM = "m") P is never formed: with M = alpha triu_1(dXXT U^T), P = M U, the cross-block term becomes
W[:, J] += c_J triu(U[J, J]) before block J (c_J = Q[:, :j1] M[:j1, J], applied by the column walk as an offset) and
Err -> Err - c_J - Q_J M[J, J] in GPTQ's own trailing GEMM, the same update with n^3/3 + r n^2 extra work instead of
2n^3/3 + r n^2.
`p_term_only=True` keeps only the asymmetric term (no GPTQ error feedback: U's off-diagonal is dropped from the
updates), the paper's Table 5 ablation "W P term only".
`exact=True` solves the same objective as GPTQ on the least-squares target V = W + alpha W dXXT H^-1
(||Q X~ - W X||^2 = ||(Q - V*) X~||^2 + const for alpha = 1), which is the exact greedy for that objective.
`order="reverse"` processes columns back to front: GPTQ then is Babai's nearest-plane algorithm (see `babai_bound`).
All arithmetic is float32 (or the input's float64) on W's device; on CUDA, GPTAQ's extra products (P, its trailing
GEMM, exact's W dXXT H^-1) may run as split TF32 with float32-level accuracy (`ASYM_MATMUL`, default "split").
Results come back in W's original column order.
The in-block column walk runs as one Triton kernel per block on CUDA (`backend="auto"`, common/fused_solver.py) or
as a PyTorch loop (`backend="torch"`, CPU and checking); the GEMMs, the factorization and P are shared.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from . import tf32
from .grid import check_bits, dequantize, quantize_codes
from .quantizer import fit_grid

__all__ = [
    "SolverError", "QuantResult", "gptq", "gptaq", "rtn", "gptq_quantize", "gptaq_quantize", "rtn_quantize",
    "proxy_loss", "babai_bound", "inverse_cholesky", "asym_matrix", "resolve_backend", "BACKENDS",
]

log = logging.getLogger(__name__)

NO_QUANT_BITS = 16  # bits=16 means "do not round": the solver only applies its (exact) corrections
MAX_DAMP_RETRIES = 6
BACKENDS = ("auto", "triton", "torch")  # column walk: Triton kernel (common/fused_solver.py) or the PyTorch loop
MAX_WALK = 128  # most columns one column walk (kernel launch) covers
PANEL = 2048  # panel width of the triangular products and the triangular inverse (measured best on an H100)
CPU_PANEL = 128  # the same on CPU, where smaller GEMMs lose little and skipping U's zero blocks pays (2.5x at n=1536)
# Precision of GPTAQ's extra products on CUDA float32 (P, its trailing GEMM, exact's W dXXT H^-1; CPU and float64
# always use plain products):
#   "split"   each float32 product from three TF32 products (common.tf32.addmm_split_): float32-level accuracy,
#   "float32" plain float32 GEMMs,
#   "tf32"    one TF32 product: fastest, but only 95.0-99.3% of codes equal a float64 solve's (P form and exact),
#             against 99.86-99.92% for float32 (bench/check_fused.py measures all three; bench/RESULTS.md).
ASYM_MATMULS = ("split", "float32", "tf32")
ASYM_MATMUL = "split"
# How GPTAQ's cross-block term is formed: "m" (default) keeps M = alpha triu_1(dXXT U^T) and folds the term into
# GPTQ's trailing GEMM (extra work n^3/3 + r n^2), "p" forms P = M U and applies it with its own trailing GEMM, as
# published (2n^3/3 + r n^2).  Same result up to float rounding; p_term_only always uses P.
ASYM_FORMS = ("m", "p")
ASYM_FORM = "m"


class SolverError(ValueError):
    """Bad input to a solver: the message names the layer and the offending value."""


@dataclass
class QuantResult:
    """A quantized layer: dequantized weight plus what an export needs.

    weight: float32 [rows, cols], the fake-quantized weight (= scales[:, g_idx] * (codes - zeros[:, g_idx])).
    codes:  int32 [rows, cols] unsigned codes in [0, 2^bits - 1] (None for bits=16).
    scales, zeros: float32 [rows, ngroups]; zeros are integer-valued (symmetric grids use 2^(bits-1)).
    g_idx:  int32 [cols], the group of each input column (act-order permutes it).
    perm:   int64 [cols], processing order: column perm[j] was quantized j-th.
    clipped: int64 [rows], per row the number of entries whose updated value fell outside the grid (rounding error
             then may exceed scale/2; Babai's bound holds for the rows with none).
    """

    weight: torch.Tensor
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    perm: torch.Tensor
    bits: int
    sym: bool
    group_size: int
    clipped: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- checks


def _check_inputs(name: str, W: torch.Tensor, H: torch.Tensor | None, dXXT: torch.Tensor | None, bits: int,
                  group_size: int, percdamp: float, blocksize: int, order: str, alpha: float | None = None) -> None:
    if W.dim() != 2:
        raise SolverError(f"{name}: W must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if bits != NO_QUANT_BITS:
        try:
            check_bits(bits)
        except ValueError as e:
            raise SolverError(f"{name}: {e} (or 16 for no rounding)") from None
    if group_size != -1 and (group_size <= 0 or cols % group_size):
        raise SolverError(f"{name}: group_size {group_size} does not divide the {cols} input columns")
    if not 0.0 <= percdamp:
        raise SolverError(f"{name}: percdamp must be >= 0, got {percdamp}")
    if blocksize < 1:
        raise SolverError(f"{name}: blocksize must be >= 1, got {blocksize}")
    if order not in ("forward", "reverse"):
        raise SolverError(f"{name}: order must be 'forward' or 'reverse', got {order!r}")
    if alpha is not None and not math.isfinite(alpha):
        raise SolverError(f"{name}: alpha must be finite, got {alpha}")
    if not torch.isfinite(W).all():
        raise SolverError(f"{name}: W has non-finite entries")
    for label, M in (("H", H), ("dXXT", dXXT)):
        if M is None:
            continue
        if M.shape != (cols, cols):
            raise SolverError(f"{name}: {label} must be [{cols}, {cols}] to match W, got {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise SolverError(f"{name}: {label} has non-finite entries")


# ------------------------------------------------------------------------------------------ preparation


def _panel(n: int, device: torch.device) -> int:
    """Panel width of the triangular products below (large panels keep the GPU's GEMMs efficient)."""
    return min(n, PANEL if device.type == "cuda" else CPU_PANEL)


def _upper_inverse(R: torch.Tensor, panel: int | None = None) -> torch.Tensor:
    """R^-1 for upper-triangular R, by column panels: R[:j2, :j2] X = I[:j2, j1:j2] (n^3/3 flops, not n^3)."""
    n = R.shape[0]
    b = panel or _panel(n, R.device)
    Rinv = torch.zeros(n, n, dtype=R.dtype, device=R.device)
    for j1 in range(0, n, b):
        j2 = min(j1 + b, n)
        rhs = torch.zeros(j2, j2 - j1, dtype=R.dtype, device=R.device)
        rhs[j1:].fill_diagonal_(1.0)
        Rinv[:j2, j1:j2] = torch.linalg.solve_triangular(R[:j2, :j2], rhs, upper=True)
    return Rinv


def _asym_mode(M: torch.Tensor) -> str:
    """The precision of GPTAQ's extra products for operands like M (see ASYM_MATMUL)."""
    if ASYM_MATMUL not in ASYM_MATMULS:
        raise SolverError(f"ASYM_MATMUL must be one of {ASYM_MATMULS}, got {ASYM_MATMUL!r}")
    return ASYM_MATMUL if M.is_cuda and M.dtype == torch.float32 else "float32"


def _asym_form() -> str:
    if ASYM_FORM not in ASYM_FORMS:
        raise SolverError(f"ASYM_FORM must be one of {ASYM_FORMS}, got {ASYM_FORM!r}")
    return ASYM_FORM


def _addmm(mode: str, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c += alpha * a @ b in `mode` ("float32" and "tf32": one product; "split": three TF32 products).  TF32 itself
    is switched on around the call sites (`tf32.tf32(mode != "float32")`)."""
    if mode == "split":
        return tf32.addmm_split_(c, a, b, alpha)
    return c.addmm_(a, b, alpha=alpha)


def _mm_upper(X: torch.Tensor, U: torch.Tensor, *, transpose: bool, strict_upper_out: bool = False,
              panel: int | None = None, mode: str = "float32") -> torch.Tensor:
    """X @ U^T (transpose) or X @ U for upper-triangular U, skipping U's zero blocks (half the dense flops).

    Column panel J of X U^T reads X[:, j1:]; of X U it reads X[:, :j2].  strict_upper_out (square X, X U^T only)
    computes just the rows i < j2 of panel J and returns triu_1(X U^T).  Products in `mode` (see `_addmm`).
    """
    n = U.shape[0]
    b = panel or _panel(n, X.device)
    out = torch.zeros(X.shape[0], n, dtype=X.dtype, device=X.device)
    for j1 in range(0, n, b):
        j2 = min(j1 + b, n)
        if transpose:
            rows = j2 if strict_upper_out else X.shape[0]
            _addmm(mode, out[:rows, j1:j2], X[:rows, j1:], U[j1:j2, j1:].T)
        else:
            _addmm(mode, out[:, j1:j2], X[:, :j2], U[:j2, j1:j2])
    return out.triu_(1) if strict_upper_out else out


def asym_cross(dXXT: torch.Tensor, U: torch.Tensor, alpha: float, panel: int | None = None,
               mode: str = "float32") -> torch.Tensor:
    """M = alpha * triu_1(dXXT U^T) (processing order), the factor of P = M U; only its strict upper part is formed
    (about n^3/3 flops).  Products in `mode` (see `_addmm`)."""
    return _mm_upper(dXXT, U, transpose=True, strict_upper_out=True, panel=panel, mode=mode).mul_(alpha)


def asym_matrix(dXXT: torch.Tensor, U: torch.Tensor, alpha: float, panel: int | None = None,
                mode: str = "float32") -> torch.Tensor:
    """GPTAQ's P = alpha * triu_1(dXXT U^T) U (processing order), computed tile by tile over the nonzero blocks.

    Both factors are triangular, so P[I, J] = M[I, I..J] U[I..J, J] with M = `asym_cross`: about 2n^3/3 flops
    against 4n^3 for the two dense products.  Products in `mode` (see `_addmm`).
    """
    n = U.shape[0]
    b = panel or _panel(n, U.device)
    M = asym_cross(dXXT, U, alpha, panel=b, mode=mode)
    P = torch.zeros_like(M)
    for i1 in range(0, n, b):
        i2 = min(i1 + b, n)
        for j1 in range(i1, n, b):
            j2 = min(j1 + b, n)
            _addmm(mode, P[i1:i2, j1:j2], M[i1:i2, i1:j2], U[i1:j2, j1:j2])
    return P


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


def inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> torch.Tensor:
    """U, upper triangular with H_damped^-1 = U^T U, H_damped = H + percdamp * mean(diag H) * I.

    H^-1 is never formed: with J the reversal, J H_d J = L L^T gives H_d = R R^T, R = J L J upper triangular, and
    U = R^-1 (the unique upper factor with positive diagonal).  A Hessian that stays non-positive-definite is retried
    with 10x the dampening (logged), up to 6 times.  H is not modified.
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
            U = _upper_inverse(L.flip(0, 1))
            if torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Hessian was not positive definite; succeeded with percdamp=%g", name, damp)
                return U
        del L
        damp = max(damp * 10.0, 1e-6)
        log.warning("%s: Hessian not positive definite after dampening; retrying with percdamp=%g", name, damp)
    raise SolverError(f"{name}: Hessian is not positive definite even with percdamp={damp:g} ({n} columns)")


def _group_blocksize(blocksize: int, group_size: int) -> int:
    """Lazy blocks made a multiple of the group size, so every group lies inside one block."""
    if group_size == -1:
        return blocksize
    return max(1, blocksize // group_size) * group_size


def _walk_width(lazy: int, group_size: int, dynamic_groups: bool) -> int:
    """Columns per column walk (one kernel launch): the largest divisor of the lazy block width that is at most
    MAX_WALK, and of the group size when groups are fitted on the current weights, so every group starts a walk."""
    span = group_size if dynamic_groups else lazy
    return max(d for d in range(1, min(span, MAX_WALK) + 1) if span % d == 0)


def _processing_order(H: torch.Tensor, act_order: bool, order: str) -> torch.Tensor:
    cols = H.shape[0]
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=H.device)
    if order == "reverse":
        perm = perm.flip(0)
    return perm


def resolve_backend(backend: str, W: torch.Tensor, name: str = "layer") -> str:
    """'torch' or 'triton' for the column walk: auto = Triton on CUDA when importable (float32), PyTorch otherwise."""
    if backend not in BACKENDS:
        raise SolverError(f"{name}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not W.is_cuda):
        return "torch"
    from . import fused_solver

    why = fused_solver.unavailable_reason(W)
    if why is None:
        return "triton"
    if backend == "triton":
        raise SolverError(f"{name}: backend='triton' {why}")
    return "torch"


# ------------------------------------------------------------------------------------------ core solve


def _walk_torch(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor | None, S1: torch.Tensor | None,
                Z1: torch.Tensor | None, maxq: int, E1: torch.Tensor, Q1: torch.Tensor,
                C: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None,
                K1: torch.Tensor | None = None) -> None:
    """The in-block column walk in PyTorch (the reference for common/fused_solver.py, same arguments).

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


def _solve(name: str, W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, *, bits: int, sym: bool,
           mse: bool, group_size: int, act_order: bool, static_groups: bool, percdamp: float, blocksize: int,
           order: str, alpha: float, exact: bool, backend: str,
           scale_dtype: torch.dtype | None = None, p_term_only: bool = False) -> QuantResult:
    """Shared body of gptq / gptaq (P form or exact); backend is 'torch' or 'triton' (see `resolve_backend`)."""
    if backend == "triton":
        from .fused_solver import walk
    else:
        walk = _walk_torch
    dev = W.device
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, cols = W.shape
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

    perm = _processing_order(H, act_order, order)
    invperm = torch.argsort(perm)
    permuted = act_order or order == "reverse"  # else the processing order is the identity: skip the gathers
    U = inverse_cholesky(H[perm][:, perm] if permuted else H, percdamp, name)
    if permuted:
        W = W[:, perm]
    P = M = None
    mode = _asym_mode(W)
    if dXXT is not None:
        D = dXXT[perm][:, perm] if permuted else dXXT
        del dXXT
        with tf32.tf32(mode != "float32"):
            if exact:
                # V = W + alpha W dXXT H^-1: the least-squares target of min ||Q X~ - W X||; GPTQ on V is the exact
                # greedy.  In processing order H^-1 = U^T U.
                WD = _addmm(mode, torch.zeros_like(W), W, D)
                W += alpha * _mm_upper(_mm_upper(WD, U, transpose=True, mode=mode), U, transpose=False, mode=mode)
                del WD
            elif p_term_only or _asym_form() == "p":
                P = asym_matrix(D, U, alpha, mode=mode)
            else:
                M = asym_cross(D, U, alpha, mode=mode)
            if p_term_only:  # no error feedback: updates use only U's diagonal (err = (w - q) / U_ii) and P
                U = torch.diag(torch.diagonal(U))
        del D

    quantize = bits != NO_QUANT_BITS
    ngroups = 1 if group_size == -1 else cols // group_size
    dynamic = quantize and group_size != -1 and not static_groups
    scales = zeros = g_pos = g_list = None
    if quantize:
        scales = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        zeros = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        pos = torch.arange(cols, device=dev)
        g_pos = pos // group_size if group_size != -1 else torch.zeros_like(pos)  # group of each position
        if group_size != -1 and static_groups:  # all grids up-front, on the original columns
            g_pos = perm // group_size
            W_orig = W[:, invperm]
            for g in range(ngroups):
                scales[:, g:g + 1], zeros[:, g:g + 1] = fit_grid(W_orig[:, g * group_size:(g + 1) * group_size],
                                                                 bits, sym, mse, scale_dtype)
            del W_orig
        elif group_size == -1:
            scales[:], zeros[:] = fit_grid(W, bits, sym, mse, scale_dtype)
        g_list = g_pos.tolist()

    # Lazy blocks of `lazy` columns, walked `width` columns at a time (a kernel launch for the Triton backend).
    # Inside a lazy block the P term uses each column before rounding; later blocks get the rounded Q:
    #   P form:  W[:, rest] -= Err U[blk, rest] - Q P[blk, rest].
    #   M form (P = M U never formed): block J is walked from W[:, J] + c_J triu(U[J, J]), c_J = Q[:, :j1] M[:j1, J]
    #            (the walk's offset), and W[:, rest] -= (Err - G) U[blk, rest] with G = c_J + Q_J M[J, J], inside
    #            GPTQ's own GEMM.
    #   (Both give W[:, j] += sum_{i < j1} q_i P[i, j]: split P[i, j] = sum_{i<k<=j} M[i, k] U[k, j] at k = j1.)
    lazy = _group_blocksize(blocksize, group_size)
    width = _walk_width(lazy, group_size, dynamic)
    maxq = 2**bits - 1
    Q = torch.empty_like(W)
    cross = None
    if M is not None:
        # split mode: per-channel codes are exact in TF32 (see _CrossTerm)
        per_channel = mode == "split" and quantize and group_size == -1 and bool((scales > 0).all())
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
        E = torch.empty(rows, n1, dtype=dtype, device=dev)  # this lazy block's err (less the offset c_J)
        for s1 in range(i1, i2, width):
            s2 = min(s1 + width, i2)
            S1 = Z1 = None
            if quantize:
                if dynamic and s1 % group_size == 0:  # a group's grid, found on the current (updated) weights
                    g = g_list[s1]
                    Wg = W[:, s1:s1 + group_size]
                    if C is not None:  # which include the group's share of the walk offset, c_grp triu(U[grp, grp])
                        g1, g2 = s1 - i1, s1 - i1 + group_size
                        Wg = Wg + _offset_value(_offset_columns(C, g1, g2)) @ U_JJ[g1:g2, g1:g2]
                    scales[:, g:g + 1], zeros[:, g:g + 1] = fit_grid(Wg, bits, sym, mse, scale_dtype)
                S1, Z1 = _column_grids(scales, zeros, g_pos, g_list, s1, s2)
            e1, e2 = s1 - i1, s2 - i1
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
                    _addmm(mode, W[:, i2:], Q[:, i1:i2], P[i1:i2, i2:])
    # W now holds every column's value before rounding (kept to count clipping below).

    info = {"backend": backend}
    if not quantize:
        return QuantResult((Q[:, invperm] if permuted else Q).float(), None, None, None, None, perm, bits, sym,
                           group_size, info=info)
    S, Z = scales[:, g_pos], zeros[:, g_pos]
    codes = torch.round(Q / S + Z)
    clipped = ((W - Q).abs() > 0.5 * S * (1 + 1e-5) + 1e-12).sum(dim=1)
    if permuted:
        Q, codes = Q[:, invperm], codes[:, invperm]
    Q = Q.float()
    if not torch.isfinite(Q).all():
        raise SolverError(f"{name}: the solve produced non-finite weights")
    return QuantResult(Q, codes.to(torch.int32), scales.float(), zeros.float(),
                       g_pos[invperm].to(torch.int32), perm, bits, sym, group_size, clipped, info)


# ------------------------------------------------------------------------------------------ public API


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False,
                  group_size: int = -1, act_order: bool = False, static_groups: bool = False,
                  percdamp: float = 0.01, blocksize: int = 128, order: str = "forward",
                  name: str = "layer", scale_dtype: torch.dtype | None = None, backend: str = "auto") -> QuantResult:
    """GPTQ with codes, scales, zeros and g_idx for export.  See `gptq`.

    scale_dtype=torch.float16 rounds every scale to float16 when it is chosen, as a GPTQ checkpoint stores it.
    """
    _check_inputs(name, W, H, None, bits, group_size, percdamp, blocksize, order)
    use = resolve_backend(backend, W, name)
    with torch.no_grad():
        return _solve(name, W, H, None, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                      static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                      alpha=0.0, exact=False, backend=use, scale_dtype=scale_dtype)


def gptaq_quantize(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, *, alpha: float = 0.25,
                   exact: bool = False, p_term_only: bool = False, bits: int, sym: bool = False, mse: bool = False,
                   group_size: int = -1, act_order: bool = False, static_groups: bool = False,
                   percdamp: float = 0.01, blocksize: int = 128, order: str = "forward", name: str = "layer",
                   scale_dtype: torch.dtype | None = None, backend: str = "auto") -> QuantResult:
    """GPTAQ with codes, scales, zeros and g_idx for export.  See `gptaq` and `gptq_quantize`."""
    _check_inputs(name, W, H, dXXT, bits, group_size, percdamp, blocksize, order, alpha)
    if exact and p_term_only:
        raise SolverError(f"{name}: p_term_only is an ablation of the P form; it does not combine with exact=True")
    use = resolve_backend(backend, W, name)
    with torch.no_grad():
        return _solve(name, W, H, dXXT, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                      static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                      alpha=alpha, exact=exact, backend=use, scale_dtype=scale_dtype, p_term_only=p_term_only)


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False,
         group_size: int = -1, act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
         blocksize: int = 128, order: str = "forward", name: str = "layer", backend: str = "auto") -> torch.Tensor:
    """GPTQ: fake-quantized W (float32, same shape) minimising ||(Q - W) X~||^2 greedily, H = (2/N) X~ X~^T.

    bits 2..8 (16: no rounding), sym/asymmetric grid, mse clip search, group_size (-1: per channel),
    act_order (columns by descending diag H), static_groups (all group grids from the original W),
    percdamp (fraction of mean diag H added to the diagonal), blocksize (lazy batch width),
    order "forward" or "reverse" (Babai's nearest plane), name (used in error messages),
    backend "auto" (Triton column walk on CUDA when importable, else PyTorch), "triton" or "torch".
    """
    return gptq_quantize(W, H, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                         static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                         name=name, backend=backend).weight


def gptaq(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, *, alpha: float = 0.25, exact: bool = False,
          p_term_only: bool = False, bits: int, sym: bool = False, mse: bool = False, group_size: int = -1,
          act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128,
          order: str = "forward", name: str = "layer", backend: str = "auto") -> torch.Tensor:
    """GPTAQ: fake-quantized W (float32) for min ||Q X~ - W X||, dXXT = (2/N)(X - X~) X~^T.

    alpha scales the asymmetric term (paper default 0.25); exact=True runs GPTQ on V = W + alpha W dXXT H^-1
    instead of the published P form; p_term_only=True drops GPTQ's error feedback and keeps only the P term
    (ablation).  Other keywords as in `gptq`.
    """
    return gptaq_quantize(W, H, dXXT, alpha=alpha, exact=exact, p_term_only=p_term_only, bits=bits, sym=sym,
                          mse=mse, group_size=group_size, act_order=act_order, static_groups=static_groups,
                          percdamp=percdamp, blocksize=blocksize, order=order, name=name, backend=backend).weight


def rtn_quantize(W: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False, group_size: int = -1,
                 name: str = "layer", scale_dtype: torch.dtype | None = None) -> QuantResult:
    """Round-to-nearest on the same grids (per channel or per group of consecutive columns)."""
    _check_inputs(name, W, None, None, bits, group_size, 0.0, 1, "forward")
    with torch.no_grad():
        rows, cols = W.shape
        Wf = W.float()
        gs = cols if group_size == -1 else group_size
        scales, zeros, codes = [], [], []
        for g0 in range(0, cols, gs):
            s, z = fit_grid(Wf[:, g0:g0 + gs], bits, sym, mse, scale_dtype)
            codes.append(quantize_codes(Wf[:, g0:g0 + gs], s, z, bits))
            scales.append(s)
            zeros.append(z)
        scales_t, zeros_t = torch.cat(scales, 1), torch.cat(zeros, 1)
        codes_t = torch.cat(codes, 1)
        g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
        weight = dequantize(codes_t, scales_t[:, g_idx.long()], zeros_t[:, g_idx.long()])
        return QuantResult(weight, codes_t.to(torch.int32), scales_t, zeros_t, g_idx,
                           torch.arange(cols, device=W.device), bits, sym, group_size)


def rtn(W: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False, group_size: int = -1,
        name: str = "layer") -> torch.Tensor:
    """Round-to-nearest baseline: fake-quantized W (float32) on the same grids as GPTQ."""
    return rtn_quantize(W, bits=bits, sym=sym, mse=mse, group_size=group_size, name=name).weight


# ------------------------------------------------------------------------------------------ diagnostics


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None = None) -> dict[str, float]:
    """Layer objectives, in the Hessian's scaling (H = (2/N) X~ X~^T, so they are (2/N) times squared norms).

    loss:      tr((Q - W) H (Q - W)^T) = (2/N) ||(Q - W) X~||^2, GPTQ's objective.
    asym_loss: (2/N)(||Q X~ - W X||^2 - ||W (X - X~)||^2) = loss - 2 tr((Q - W) dXXT^T W^T), GPTAQ's
               objective less its Q-independent constant (comparable across methods; may be negative).
    Products in float32 (float64 when W is float64), sums in float64: a log value, not worth float64 GEMMs.
    """
    with torch.no_grad():
        dt = torch.float64 if W.dtype == torch.float64 else torch.float32
        Wd = W.to(dt)
        D = Q.to(W.device, dt) - Wd
        out = {"loss": float(torch.sum(((D @ H.to(W.device, dt)) * D).double()))}
        if dXXT is not None:
            cross = torch.sum(((D @ dXXT.to(W.device, dt).T) * Wd).double())
            out["asym_loss"] = out["loss"] - 2.0 * float(cross)
        return out


def babai_bound(result: QuantResult, H: torch.Tensor, percdamp: float = 0.01, per_row: bool = False
                ) -> float | torch.Tensor:
    """Worst-case bound on GPTQ's objective tr((Q - W) H_d (Q - W)^T) when no entry was clipped.

    In processing order, H_d = R R^T with R = U^-1 upper triangular (H_d^-1 = U^T U), and GPTQ's objective equals
    sum_i err_i^2 with err_i = (w'_i - q_i)/U_ii (w' the updated column).  Rounding to nearest gives
    |w'_i - q_i| <= scale/2, hence objective <= 1/4 * sum_rows sum_i scale_{row, g(i)}^2 * R_ii^2, R_ii = 1/U_ii.
    The bound holds for the undamped H too (H <= H_d), row by row for the rows with result.clipped == 0;
    per_row=True returns the float64 [rows] tensor of row bounds.
    """
    if result.scales is None:
        raise SolverError("babai_bound needs a quantized result (bits 2..8)")
    with torch.no_grad():
        Hp = H.double().clone()
        dead = torch.diag(Hp) == 0
        Hp[dead, dead] = 1
        perm = result.perm.to(Hp.device)
        U = inverse_cholesky(Hp[perm][:, perm], percdamp)
        r2 = 1.0 / torch.diag(U) ** 2  # R_ii^2 in processing order
        s = result.scales.double().to(Hp.device)[:, result.g_idx.long().to(Hp.device)[perm]]
        rows = 0.25 * torch.sum(s**2 * r2.unsqueeze(0), dim=1)
        return rows if per_row else float(rows.sum())
