"""Layer objectives and Babai's bound: loss = tr((Q - W) H (Q - W)^T), GPTAQ's loss - 2 tr((Q - W) dXXT^T W^T), and
with H_d = R R^T (R = U^-1) the worst case 1/4 sum_i scale^2 R_ii^2 of GPTQ's objective when nothing is clipped.
"""
from __future__ import annotations

import torch

from common.solver.config import SolverConfig
from common.solver.linalg import inverse_cholesky
from common.solver.result import QuantResult, SolverError

__all__ = ["proxy_loss", "babai_bound"]


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


def babai_bound(result: QuantResult, H: torch.Tensor, cfg: SolverConfig | None = None, *, per_row: bool = False
                ) -> float | torch.Tensor:
    """Worst-case bound on GPTQ's objective tr((Q - W) H_d (Q - W)^T) when no entry was clipped.

    In processing order, H_d = R R^T with R = U^-1 upper triangular (H_d^-1 = U^T U), and GPTQ's objective equals
    sum_i err_i^2 with err_i = (w'_i - q_i)/U_ii (w' the updated column).  Rounding to nearest gives
    |w'_i - q_i| <= scale/2, hence objective <= 1/4 * sum_rows sum_i scale_{row, g(i)}^2 * R_ii^2, R_ii = 1/U_ii.
    H_d is dampened with cfg.percdamp (the solve's configuration; default SolverConfig()).  The bound holds for the
    undamped H too (H <= H_d), row by row for the rows with result.clipped == 0; per_row=True returns the float64
    [rows] tensor of row bounds.
    """
    if result.scales is None:
        raise SolverError("babai_bound needs a quantized result (bits 2..8)")
    cfg = cfg or SolverConfig()
    with torch.no_grad():
        Hp = H.double().clone()
        dead = torch.diag(Hp) == 0
        Hp[dead, dead] = 1
        perm = result.perm.to(Hp.device)
        U = inverse_cholesky(Hp[perm][:, perm], cfg.percdamp)
        r2 = 1.0 / torch.diag(U) ** 2  # R_ii^2 in processing order
        s = result.scales.double().to(Hp.device)[:, result.g_idx.long().to(Hp.device)[perm]]
        rows = 0.25 * torch.sum(s**2 * r2.unsqueeze(0), dim=1)
        return rows if per_row else float(rows.sum())
