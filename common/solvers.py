"""GPTQ and GPTAQ layer solvers: the public function API.

GPTQ quantizes W column by column in a processing order and pushes each column's rounding error onto the
columns not yet quantized through U, the upper Cholesky factor of H^-1 (H^-1 = U^T U, H = (2/N) X~ X~^T):
    err_i = (w_i - q_i) / U_ii,        W[:, i:] -= err_i U[i, i:].
GPTAQ (GPTQv2) fits Q X~ to the full-precision output W X.  With dXXT = (2/N)(X - X~) X~^T and
P = alpha * triu_1(dXXT U^T) U it adds the asymmetric term at each step (published "P form"):
    W[:, i:] -= err_i U[i, i:] - w_i P[i, i:]        (w_i the column before rounding),
and across lazy blocks W[:, rest] -= Err U[blk, rest] - W_blk P[blk, rest] (W_blk the block after its steps).
`exact=True` solves the same objective as GPTQ on the least-squares target V = W + alpha W dXXT H^-1
(||Q X~ - W X||^2 = ||(Q - V*) X~||^2 + const for alpha = 1), which is the exact greedy for that objective.
`order="reverse"` processes columns back to front: GPTQ then is Babai's nearest-plane algorithm (see `babai_bound`).
All arithmetic is float32 (or the input's float64) on W's device; results come back in W's original column order.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from .grid import check_bits, dequantize, quantize_codes
from .quantizer import fit_grid

__all__ = [
    "SolverError", "QuantResult", "gptq", "gptaq", "rtn", "gptq_quantize", "gptaq_quantize", "rtn_quantize",
    "proxy_loss", "babai_bound", "inverse_cholesky",
]

log = logging.getLogger(__name__)

NO_QUANT_BITS = 16  # bits=16 means "do not round": the solver only applies its (exact) corrections
MAX_DAMP_RETRIES = 6


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


def inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> torch.Tensor:
    """U, upper triangular with H_damped^-1 = U^T U, H_damped = H + percdamp * mean(diag H) * I.

    A Hessian that stays non-positive-definite is retried with 10x the dampening (logged), up to 6 times.
    H is not modified.
    """
    n = H.shape[0]
    mean_diag = torch.diag(H).mean()
    damp = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Hessian was not positive definite; succeeded with percdamp=%g", name, damp)
                return U
        damp = max(damp * 10.0, 1e-6)
        log.warning("%s: Hessian not positive definite after dampening; retrying with percdamp=%g", name, damp)
    raise SolverError(f"{name}: Hessian is not positive definite even with percdamp={damp:g} ({n} columns)")


def _group_blocksize(blocksize: int, group_size: int) -> int:
    """Lazy blocks made a multiple of the group size, so every group lies inside one block."""
    if group_size == -1:
        return blocksize
    return max(1, blocksize // group_size) * group_size


def _processing_order(H: torch.Tensor, act_order: bool, order: str) -> torch.Tensor:
    cols = H.shape[0]
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=H.device)
    if order == "reverse":
        perm = perm.flip(0)
    return perm


# ------------------------------------------------------------------------------------------ core solve


def _solve(name: str, W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, *, bits: int, sym: bool,
           mse: bool, group_size: int, act_order: bool, static_groups: bool, percdamp: float, blocksize: int,
           order: str, alpha: float, exact: bool,
           scale_dtype: torch.dtype | None = None) -> QuantResult:
    """Shared body of gptq / gptaq (P form or exact)."""
    dev = W.device
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    rows, cols = W.shape
    W = W.to(dtype).clone()
    H = H.to(dev, dtype).clone()
    if dXXT is not None:
        dXXT = dXXT.to(dev, dtype).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXXT is not None:
        dXXT[:, dead] = 0

    U_orig = inverse_cholesky(H, percdamp, name) if exact else None
    if exact and dXXT is not None:
        # V = W + alpha W dXXT H^-1: the least-squares target of min ||Q X~ - W X||; GPTQ on V is the exact greedy.
        W = W + alpha * ((W @ dXXT) @ U_orig.T) @ U_orig
        dXXT = None

    quantize = bits != NO_QUANT_BITS
    ngroups = 1 if group_size == -1 else cols // group_size
    static = None
    if quantize and group_size != -1 and static_groups:
        static = [fit_grid(W[:, g * group_size:(g + 1) * group_size], bits, sym, mse, scale_dtype) for g in range(ngroups)]

    perm = _processing_order(H, act_order, order)
    W = W[:, perm]
    H = H[perm][:, perm]
    if dXXT is not None:
        dXXT = dXXT[perm][:, perm]
    U = inverse_cholesky(H, percdamp, name)
    P = None
    if dXXT is not None:
        P = alpha * torch.triu(dXXT @ U.T, diagonal=1) @ U

    Q = torch.zeros_like(W)
    scales = zeros = g_pos = None
    if quantize:
        scales = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        zeros = torch.zeros(rows, ngroups, dtype=dtype, device=dev)
        pos = torch.arange(cols, device=dev)
        g_pos = pos // group_size if group_size != -1 else torch.zeros_like(pos)  # group of each position
        if static is not None:
            g_pos = perm // group_size
            for g, (s_g, z_g) in enumerate(static):
                scales[:, g:g + 1], zeros[:, g:g + 1] = s_g, z_g
        elif group_size == -1:
            scales[:], zeros[:] = fit_grid(W, bits, sym, mse, scale_dtype)
    g_list = g_pos.tolist() if quantize else None

    # Per column the update is one GEMM with inner dimension 2 for both methods:
    #   W[:, i:] -= [w, q] @ [B[i, i:]; -B[i, i:]]          (GPTQ:  (w - q) B[i, i:])
    #   W[:, i:] -= [w, q] @ [B[i, i:] - P[i, i:]; -B[i, i:]] (GPTAQ: err U[i, i:] - w P[i, i:])
    # with B = U / diag(U) row-wise, so GPTAQ costs the same per column as GPTQ.
    bs = _group_blocksize(blocksize, group_size)
    maxq = 2**bits - 1
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        n1 = i2 - i1
        W1 = W[:, i1:i2].clone()
        WQ = torch.empty(rows, n1, 2, dtype=dtype, device=dev)  # [:, i, 0] column before rounding, [:, i, 1] rounded
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        B1 = U1 / d1.unsqueeze(1)
        coef = torch.stack((B1 if P is None else B1 - P[i1:i2, i1:i2], -B1), dim=1)  # [n1, 2, n1]
        for i in range(n1):
            j = i1 + i
            w, q = WQ[:, i, 0], WQ[:, i, 1]
            w.copy_(W1[:, i])
            if quantize:
                g = g_list[j]
                if static is None and group_size != -1 and j % group_size == 0:
                    scales[:, g:g + 1], zeros[:, g:g + 1] = fit_grid(W1[:, i:i + group_size], bits, sym, mse,
                                                                               scale_dtype)
                s_g, z_g = scales[:, g], zeros[:, g]
                torch.mul(s_g, torch.clamp(torch.round(w / s_g) + z_g, 0, maxq) - z_g, out=q)
            else:
                q.copy_(w)
            W1[:, i:].addmm_(WQ[:, i, :], coef[i, :, i:], alpha=-1)
        Wpre, Q1 = WQ[:, :, 0], WQ[:, :, 1]
        Q[:, i1:i2] = Q1
        if i2 < cols:
            W[:, i2:].addmm_((Wpre - Q1) / d1, U[i1:i2, i2:], alpha=-1)
            if P is not None:
                W[:, i2:].addmm_(W1, P[i1:i2, i2:])
        W[:, i1:i2] = Wpre  # kept only to count clipping below

    invperm = torch.argsort(perm)
    if not quantize:
        return QuantResult(Q[:, invperm].float(), None, None, None, None, perm, bits, sym, group_size)
    S, Z = scales[:, g_pos], zeros[:, g_pos]
    codes = torch.round(Q / S + Z)
    clipped = ((W - Q).abs() > 0.5 * S * (1 + 1e-5) + 1e-12).sum(dim=1)  # W now holds the pre-rounding values
    Q = Q[:, invperm].float()
    if not torch.isfinite(Q).all():
        raise SolverError(f"{name}: the solve produced non-finite weights")
    return QuantResult(Q, codes[:, invperm].to(torch.int32), scales.float(), zeros.float(),
                       g_pos[invperm].to(torch.int32), perm, bits, sym, group_size, clipped)


# ------------------------------------------------------------------------------------------ public API


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False,
                  group_size: int = -1, act_order: bool = False, static_groups: bool = False,
                  percdamp: float = 0.01, blocksize: int = 128, order: str = "forward",
                  name: str = "layer", scale_dtype: torch.dtype | None = None) -> QuantResult:
    """GPTQ with codes, scales, zeros and g_idx for export.  See `gptq`.

    scale_dtype=torch.float16 rounds every scale to float16 when it is chosen, as a GPTQ checkpoint stores it.
    """
    _check_inputs(name, W, H, None, bits, group_size, percdamp, blocksize, order)
    with torch.no_grad():
        return _solve(name, W, H, None, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                      static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                      alpha=0.0, exact=False, scale_dtype=scale_dtype)


def gptaq_quantize(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, *, alpha: float = 0.25,
                   exact: bool = False, bits: int, sym: bool = False, mse: bool = False, group_size: int = -1,
                   act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                   blocksize: int = 128, order: str = "forward", name: str = "layer",
                   scale_dtype: torch.dtype | None = None) -> QuantResult:
    """GPTAQ with codes, scales, zeros and g_idx for export.  See `gptaq` and `gptq_quantize`."""
    _check_inputs(name, W, H, dXXT, bits, group_size, percdamp, blocksize, order, alpha)
    with torch.no_grad():
        return _solve(name, W, H, dXXT, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                      static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                      alpha=alpha, exact=exact, scale_dtype=scale_dtype)


def gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int, sym: bool = False, mse: bool = False,
         group_size: int = -1, act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
         blocksize: int = 128, order: str = "forward", name: str = "layer") -> torch.Tensor:
    """GPTQ: fake-quantized W (float32, same shape) minimising ||(Q - W) X~||^2 greedily, H = (2/N) X~ X~^T.

    bits 2..8 (16: no rounding), sym/asymmetric grid, mse clip search, group_size (-1: per channel),
    act_order (columns by descending diag H), static_groups (all group grids from the original W),
    percdamp (fraction of mean diag H added to the diagonal), blocksize (lazy batch width),
    order "forward" or "reverse" (Babai's nearest plane), name (used in error messages).
    """
    return gptq_quantize(W, H, bits=bits, sym=sym, mse=mse, group_size=group_size, act_order=act_order,
                         static_groups=static_groups, percdamp=percdamp, blocksize=blocksize, order=order,
                         name=name).weight


def gptaq(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, *, alpha: float = 0.25, exact: bool = False,
          bits: int, sym: bool = False, mse: bool = False, group_size: int = -1, act_order: bool = False,
          static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128, order: str = "forward",
          name: str = "layer") -> torch.Tensor:
    """GPTAQ: fake-quantized W (float32) for min ||Q X~ - W X||, dXXT = (2/N)(X - X~) X~^T.

    alpha scales the asymmetric term (paper default 0.25); exact=True runs GPTQ on V = W + alpha W dXXT H^-1
    instead of the published P form.  Other keywords as in `gptq`.
    """
    return gptaq_quantize(W, H, dXXT, alpha=alpha, exact=exact, bits=bits, sym=sym, mse=mse, group_size=group_size,
                          act_order=act_order, static_groups=static_groups, percdamp=percdamp, blocksize=blocksize,
                          order=order, name=name).weight


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
    """
    with torch.no_grad():
        D = (Q.double() - W.double())
        Hd = H.double()
        out = {"loss": float(torch.sum((D @ Hd) * D))}
        if dXXT is not None:
            out["asym_loss"] = out["loss"] - 2.0 * float(torch.sum((D @ dXXT.double().T) * W.double()))
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
