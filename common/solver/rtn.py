"""Round to nearest: every entry of W on its grid, q = s (clamp(round(w / s) + z, 0, maxq) - z), no error feedback.

One grid per output channel (group_size -1) or per group of consecutive input columns (the last one narrower where
the group size does not divide the input features), fitted by `SolverConfig.fit_grid` (with the MSE clip search when
cfg.mse), the grids GPTQ uses.
"""
from __future__ import annotations

import torch

from common.quant.grid import dequantize, quantize_codes
from common.solver.config import NO_QUANT_BITS, SolverConfig
from common.solver.result import QuantResult

__all__ = ["solve"]


@torch.no_grad()
def solve(W: torch.Tensor, cfg: SolverConfig) -> QuantResult:
    """RTN of W [rows, cols] on cfg's grids (bits 16: W itself, as float32)."""
    cols = W.shape[1]
    Wf = W.float()
    perm = torch.arange(cols, device=W.device)
    if cfg.bits == NO_QUANT_BITS:
        return QuantResult(Wf.clone(), None, None, None, None, perm, cfg.bits, cfg.sym, cfg.group_size,
                           info={"backend": "rtn"})
    gs = cols if cfg.group_size == -1 else cfg.group_size
    scales, zeros, codes = [], [], []
    for g0 in range(0, cols, gs):
        s, z = cfg.fit_grid(Wf[:, g0:g0 + gs])
        codes.append(quantize_codes(Wf[:, g0:g0 + gs], s, z, cfg.bits))
        scales.append(s)
        zeros.append(z)
    scales_t, zeros_t, codes_t = torch.cat(scales, 1), torch.cat(zeros, 1), torch.cat(codes, 1)
    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
    weight = dequantize(codes_t, scales_t[:, g_idx.long()], zeros_t[:, g_idx.long()])
    return QuantResult(weight, codes_t.to(torch.int32), scales_t, zeros_t, g_idx, perm, cfg.bits, cfg.sym,
                       cfg.group_size, info={"backend": "rtn"})
