"""What a layer solve returns: the fake-quantized weight Q = s (k - z) with its codes k, grids (s, z) and layout.

Every backend solves in a processing order (perm) and hands `pack_result` the rounded columns Q and the values w they
were rounded from; codes k = round(Q / s + z), and an entry is "clipped" when |w - q| > s / 2 (w left the grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.solver.config import SolverConfig

__all__ = ["SolverError", "QuantResult", "pack_result"]


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
    info:   {"backend": the backend that solved it, ...}.
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


def pack_result(name: str, cfg: SolverConfig, Q: torch.Tensor, W_pre: torch.Tensor | None,
                scales: torch.Tensor | None, zeros: torch.Tensor | None, g_pos: torch.Tensor | None,
                perm: torch.Tensor, info: dict) -> QuantResult:
    """The QuantResult of a solve done in processing order, columns put back in W's order.

    Q [rows, cols]: the rounded columns (processing order); W_pre: each column's value before rounding; scales, zeros
    [rows, ngroups] and g_pos [cols] (the group of each processing position): the grids, None without rounding.
    """
    cols = Q.shape[1]
    permuted = not torch.equal(perm, torch.arange(cols, device=perm.device))
    invperm = torch.argsort(perm) if permuted else None
    if scales is None:
        return QuantResult((Q[:, invperm] if permuted else Q).float(), None, None, None, None, perm, cfg.bits,
                           cfg.sym, cfg.group_size, info=info)
    S, Z = scales[:, g_pos], zeros[:, g_pos]
    codes = torch.round(Q / S + Z)
    clipped = ((W_pre - Q).abs() > 0.5 * S * (1 + 1e-5) + 1e-12).sum(dim=1)
    g_idx = g_pos
    if permuted:
        Q, codes, g_idx = Q[:, invperm], codes[:, invperm], g_pos[invperm]
    Q = Q.float()
    if not torch.isfinite(Q).all():
        raise SolverError(f"{name}: the solve produced non-finite weights")
    return QuantResult(Q, codes.to(torch.int32), scales.float(), zeros.float(), g_idx.to(torch.int32), perm,
                       cfg.bits, cfg.sym, cfg.group_size, clipped, info)
