"""Cayley SGD on the orthogonal group (square Stiefel manifold), as used by SpinQuant (Li et al., ICLR 2020).

For an orthogonal parameter R (n x n, R^T R = I) with Euclidean gradient G, the step is
    A = 1/2 (M R^T - R M^T)                      (skew-symmetric: the tangent direction is -A R),
    R <- (I + a/2 A)^-1 (I - a/2 A) R            (Cayley retraction; orthogonal for any skew A),
with M = G, or M = beta M_prev + G with momentum (M_prev stored as the last tangent step A R).
The step size is a = min(lr, 2 q / ||A||_1) (q = 0.5, ||.||_1 the max column sum) as in Li et al.'s
Algorithm 2 and SpinQuant's SGDG, so lr 1.5 behaves like the published recipe.  The factor 1/2 in A is
Li et al.'s projection for square matrices, which makes the lr scale match theirs.

retraction="exact" solves the linear system (in `compute_dtype`, float64 by default); "fixed_point" runs
Li et al.'s iteration Y <- R - a/2 A (R + Y) from Y = R - a A R (`fixed_point_iters` times), which is only
approximately orthogonal, so the result is re-orthonormalised (QR with positive diagonal) every
`reorth_every` steps (0 = never; it is cheap and also removes float32 storage drift).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

__all__ = ["CayleySGD", "orthogonality_error", "reorthonormalize"]

RETRACTIONS = ("exact", "fixed_point")


def orthogonality_error(R: torch.Tensor) -> float:
    """||R^T R - I||_F computed in float64."""
    R = R.detach().double()
    return torch.linalg.matrix_norm(R.T @ R - torch.eye(R.shape[1], dtype=R.dtype, device=R.device)).item()


def reorthonormalize(R: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q of R = QU (QR with a positive diagonal of U): the nearest-in-spirit orthogonal matrix."""
    q, r = torch.linalg.qr(R)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1
    return q * sign.unsqueeze(0)


class CayleySGD(Optimizer):
    """SGD on square orthogonal parameters with the Cayley retraction (see the module docstring).

    params: square parameters with R^T R = I (a ValueError otherwise).  lr: the step bound (SpinQuant: 1.5,
    linearly decayed).  momentum: heavy-ball factor on the tangent direction.  clip_q: the q of the step
    bound a = min(lr, 2q/||A||_1); None disables it (plain a = lr).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, momentum: float = 0.0, *,
                 clip_q: float | None = 0.5, retraction: str = "exact", fixed_point_iters: int = 5,
                 reorth_every: int = 0, compute_dtype: torch.dtype = torch.float64, check_tol: float = 1e-3):
        if not lr > 0:
            raise ValueError(f"CayleySGD: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"CayleySGD: momentum must be in [0, 1), got {momentum}")
        if clip_q is not None and not clip_q > 0:
            raise ValueError(f"CayleySGD: clip_q must be > 0 or None, got {clip_q}")
        if retraction not in RETRACTIONS:
            raise ValueError(f"CayleySGD: retraction must be one of {RETRACTIONS}, got {retraction!r}")
        if fixed_point_iters < 1 or reorth_every < 0:
            raise ValueError("CayleySGD: fixed_point_iters must be >= 1 and reorth_every >= 0")
        defaults = dict(lr=lr, momentum=momentum, clip_q=clip_q)
        super().__init__(params, defaults)
        self.retraction, self.fixed_point_iters = retraction, fixed_point_iters
        self.reorth_every, self.compute_dtype = reorth_every, compute_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD: parameters must be square matrices, got shape {tuple(p.shape)}")
                err = orthogonality_error(p) / p.shape[0] ** 0.5
                if err > check_tol:
                    raise ValueError(f"CayleySGD: parameter of shape {tuple(p.shape)} is not orthogonal "
                                     f"(||R^T R - I||_F / sqrt(n) = {err:.2e})")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        R = p.detach().to(self.compute_dtype)
        M = p.grad.detach().to(self.compute_dtype)
        if group["momentum"] > 0 and "momentum_buffer" in state:
            M = M + group["momentum"] * state["momentum_buffer"]
        A = 0.5 * (M @ R.T - R @ M.T)
        lr = group["lr"]
        if group["clip_q"] is not None:
            lr = min(lr, 2.0 * group["clip_q"] / (torch.linalg.matrix_norm(A, ord=1).item() + 1e-8))
        state["last_step_size"] = lr
        if self.retraction == "exact":
            eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
            R_new = torch.linalg.solve(eye + (lr / 2) * A, R - (lr / 2) * (A @ R))
        else:
            Y = R - lr * (A @ R)
            for _ in range(self.fixed_point_iters):
                Y = R - (lr / 2) * (A @ (R + Y))
            R_new = Y
        if self.reorth_every and state["step"] % self.reorth_every == 0:
            R_new = reorthonormalize(R_new)
        if group["momentum"] > 0:
            state["momentum_buffer"] = A @ R  # the tangent direction just taken (as a gradient-shaped matrix)
        p.copy_(R_new.to(p.dtype))
