"""The published GPTQ and GPTAQ layer loops, written to be read (and edited) top to bottom: the definition that the
fast backends (common.solver.blocked) are checked against (SolverConfig.backend = "reference").

GPTQ (IST-DASLab gptq.py, QuaRot) minimises ||(Q - W) X~||^2 column by column, H = (2/N) X~ X~^T.  In processing
order, with the dampened H_d = H + percdamp mean(diag H) I and its inverse's upper Cholesky factor U (H_d^-1 = U^T U):
    q_i = quantize(w_i),   err_i = (w_i - q_i) / U_ii,   W[:, i:] -= err_i U[i, i:]
with lazy blocks: inside a block the updates go to a copy W1 of its columns, after it the later columns get
W[:, i2:] -= Err1 U[i1:i2, i2:] in one product.
GPTAQ (GPTQv2, the authors' "P form") fits Q X~ to the full-precision output W X: dXXT = (2/N)(X - X~) X~^T,
P = alpha triu_1(dXXT U^T) U, and the updates gain the asymmetric term (w_i: the column before rounding)
    W1[:, i:] -= err_i U[i, i:] - w_i P[i, i:]          W[:, i2:] -= Err1 U[i1:i2, i2:] - Q1 P[i1:i2, i2:].
Variants: "exact" is GPTQ on the least-squares target V = W + alpha W dXXT H_d^-1; "p_term_only" (the paper's
Table 5 ablation) drops GPTQ's error feedback, U's off-diagonal, and keeps diag(U) and P.
Conventions: U is `inverse_cholesky`'s, the published cholesky(cholesky_inverse(cholesky(H_d)), upper=True) without
forming H_d^-1 (retried with 10x the dampening while H_d is not positive definite); dead inputs (diag H = 0) get
H_ii = 1, a zero weight column and a zero dXXT column; act_order processes columns by descending diag(H), order
"reverse" flips the order (Babai's nearest plane); grids are `SolverConfig.fit_grid`'s (symmetric convention
sym_grid, MSE clip search with mse): per channel,
fitted once on the whole W; static groups, each fitted on the unpermuted W before the solve; otherwise a group's
grid is fitted when its first column comes up, on W[:, group] as it stands when the lazy block starts (the block's
in-block updates live in W1 until it ends) - or, with group_fit "updated", on W1's updated columns.  Lazy blocks are
blocksize made a multiple of the group size (`lazy_blocksize`); bits 16 means no rounding.  A group size that does not
divide the columns leaves a narrower last group (ceil(cols / gs) grids per row): each group's slice W[:, g:g + gs]
stops at the last column, as in the published loops (and GPTQModel's).
Arithmetic is float64 for a float64 W, else float32; no TF32, no M form, no fused kernels.
"""
from __future__ import annotations

import torch

from common.quant.grid import fake_quantize
from common.solver import tf32
from common.solver.config import NO_QUANT_BITS, SolverConfig
from common.solver.linalg import inverse_cholesky, lazy_blocksize, processing_order
from common.solver.result import QuantResult, pack_result

__all__ = ["solve"]


@torch.no_grad()
def solve(name: str, W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, cfg: SolverConfig
          ) -> QuantResult:
    """GPTQ (dXXT None) or GPTAQ (dXXT given, cfg.gptaq) of W [rows, cols] by the published loop (plain float32
    products on CUDA too, whatever torch's TF32 setting)."""
    with tf32.tf32(False):
        return _solve(name, W, H, dXXT, cfg)


def _solve(name: str, W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor | None, cfg: SolverConfig
           ) -> QuantResult:
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype).clone()
    H = H.to(W.device, dtype).clone()
    rows, cols = W.shape
    gs, bits, quantize = cfg.group_size, cfg.bits, cfg.bits != NO_QUANT_BITS

    grid = cfg.fit_grid
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXXT is not None:
        dXXT = dXXT.to(W.device, dtype).clone()
        dXXT[:, dead] = 0

    # processing order, and U: the upper Cholesky factor of H_d^-1 (dampened, retried with more dampening if needed)
    perm = processing_order(H, cfg.act_order, cfg.order)
    W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, cfg.percdamp, name)

    # --- GPTAQ: the asymmetric term P, or the exact variant's target V ---------------------------------------------
    P = None
    if dXXT is not None:
        alpha, variant = cfg.gptaq.alpha, cfg.gptaq.variant
        D = dXXT[perm][:, perm]
        if variant == "exact":
            W = W + alpha * W @ D @ U.T @ U  # V = W + alpha W dXXT H_d^-1; then plain GPTQ on V
        else:
            P = alpha * torch.triu(D @ U.T, diagonal=1) @ U
        if variant == "p_term_only":
            U = torch.diag(torch.diag(U))  # no error feedback: only err = (w - q) / U_ii, and P
    # ----------------------------------------------------------------------------------------------------------------

    # grids: scales[:, k], zeros[:, k] of group k; g_pos[j] is the group of processing position j
    ngroups = cfg.num_groups(cols)  # the last group is narrower where gs does not divide cols (slices stop at cols)
    scales = torch.zeros(rows, ngroups, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    if gs == -1:
        g_pos = torch.zeros(cols, dtype=torch.long, device=W.device)
    elif cfg.static_groups:
        g_pos = perm // gs
    else:
        g_pos = torch.arange(cols, device=W.device) // gs
    if quantize and gs == -1:
        scales[:, :1], zeros[:, :1] = grid(W)
    if quantize and gs != -1 and cfg.static_groups:
        W_orig = W[:, torch.argsort(perm)]
        for k in range(ngroups):
            scales[:, k:k + 1], zeros[:, k:k + 1] = grid(W_orig[:, k * gs:(k + 1) * gs])

    group_of = g_pos.tolist()
    Q = torch.zeros_like(W)
    W_pre = torch.zeros_like(W)  # each column before rounding (to count clipped entries)
    blocksize = lazy_blocksize(cfg.blocksize, gs)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        P1 = None if P is None else P[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i].clone()
            if quantize and gs != -1 and not cfg.static_groups and j % gs == 0:
                src = W1[:, i:i + gs] if cfg.group_fit == "updated" else W[:, j:j + gs]  # W: as the block started
                scales[:, j // gs:j // gs + 1], zeros[:, j // gs:j // gs + 1] = grid(src)
            if quantize:
                k = group_of[j]
                q = fake_quantize(w.unsqueeze(1), scales[:, k:k + 1], zeros[:, k:k + 1], bits).flatten()
            else:
                q = w
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            if P is not None:
                W1[:, i:] += w.unsqueeze(1) * P1[i, i:].unsqueeze(0)  # GPTAQ: + w_i P[i, i:] in the block
            Q1[:, i] = q
            Err1[:, i] = err
            W_pre[:, j] = w
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += Q1 @ P[i1:i2, i2:]  # GPTAQ: + Q1 P[i1:i2, i2:] after the block

    if not quantize:
        scales = zeros = g_pos = None
    return pack_result(name, cfg, Q, W_pre, scales, zeros, g_pos, perm, {"backend": "reference"})
