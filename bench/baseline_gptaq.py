"""A straightforward PyTorch transcription of the published GPTQ / GPTAQ column loop (per-channel grid).

This is the speed baseline for bench/solver.py, not library code: each column is rounded, then the remaining
columns of its block get err * U[i, i:] (and, for GPTAQ, - w * P[i, i:]) as separate outer products, and the
trailing columns get one GEMM per block.  U comes from Cholesky, explicit inverse, Cholesky and P from two dense
products, as written in the papers.  GPTAQ exact is the same GPTQ loop on V = W + alpha W dXXT H^-1.
"""
from __future__ import annotations

import torch

from common.quantizer import fit_grid


@torch.no_grad()
def baseline_solve(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, bits: int, alpha: float = 0.25,
                   percdamp: float = 0.01, blocksize: int = 128, exact: bool = False) -> torch.Tensor:
    W = W.float().clone()
    H = H.float().clone()
    cols = W.shape[1]
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    P = None
    if dXXT is not None and exact:
        W = W + alpha * W @ dXXT.float() @ Hinv
    elif dXXT is not None:
        P = alpha * torch.triu(dXXT.float() @ U.T, diagonal=1) @ U
    scale, zero = fit_grid(W, bits)
    maxq = 2**bits - 1
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i].clone()
            q = (scale * (torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq) - zero)).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            if P is not None:
                W1[:, i:] += w.unsqueeze(1) @ P[i1 + i, i1 + i:i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += W1 @ P[i1:i2, i2:]
    return Q
