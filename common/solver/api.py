"""The solvers' entry points: one linear's W [out, in] and its statistics (H = (2/N) X~ X~^T, dXXT = (2/N)(X - X~) X~^T)
in, a QuantResult out; every setting comes from a SolverConfig (common/solver/config.py holds all defaults).

`quantize_linear(W, H, dXXT, cfg)` dispatches on cfg.method (gptq: min ||(Q - W) X~||, gptaq: min ||Q X~ - W X||,
rtn) and cfg.backend (reference: the published loop; torch / triton: the blocked solver); the per-method functions
take overrides of single fields, e.g. `gptaq(W, H, dXXT, bits=4, variant="exact")`.
"""
from __future__ import annotations

from typing import Any

import torch

from common.solver import blocked, reference, rtn as rtn_solver
from common.solver.config import SolverConfig
from common.solver.result import QuantResult, SolverError

__all__ = ["quantize_linear", "gptq_quantize", "gptaq_quantize", "rtn_quantize", "gptq", "gptaq", "rtn",
           "resolve_backend"]


def resolve_backend(backend: str, W: torch.Tensor, name: str = "layer") -> str:
    """The backend that solves W: "reference", "torch" or "triton" (auto: the Triton walk on a float32/float16/bfloat16
    CUDA tensor when triton imports, else torch; "triton" where it cannot run is a SolverError)."""
    if backend in ("reference", "torch"):
        return backend
    if backend == "auto" and not W.is_cuda:
        return "torch"
    from common.solver import triton_walk

    why = triton_walk.unavailable_reason(W)
    if why is None:
        return "triton"
    if backend == "triton":
        raise SolverError(f"{name}: backend='triton' {why}")
    return "torch"


def _check_inputs(name: str, W: torch.Tensor, H: torch.Tensor | None, dXXT: torch.Tensor | None,
                  cfg: SolverConfig) -> None:
    if not isinstance(cfg, SolverConfig):
        raise TypeError(f"{name}: cfg must be a SolverConfig, got {type(cfg).__name__}")
    if cfg.method == "none":
        raise SolverError(f"{name}: method 'none' quantizes nothing (callers check cfg.active)")
    if W.dim() != 2:
        raise SolverError(f"{name}: W must be 2-D [out_features, in_features], got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if not torch.isfinite(W).all():
        raise SolverError(f"{name}: W has non-finite entries")
    needed = {"gptq": ("H",), "gptaq": ("H", "dXXT"), "rtn": ()}[cfg.method]
    for label, M in (("H", H), ("dXXT", dXXT)):
        if label not in needed:
            continue
        if M is None:
            raise SolverError(f"{name}: {cfg.method} needs {label}")
        if M.shape != (cols, cols):
            raise SolverError(f"{name}: {label} must be [{cols}, {cols}] to match W, got {tuple(M.shape)}")
        if not torch.isfinite(M).all():
            raise SolverError(f"{name}: {label} has non-finite entries")


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, dXXT: torch.Tensor | None, cfg: SolverConfig,
                    name: str = "layer") -> QuantResult:
    """Quantize one linear's W [out, in] as cfg says (method gptq, gptaq or rtn; H and dXXT may be None where the
    method does not use them: dXXT for GPTQ, both for RTN).  Bad input is a SolverError naming `name`."""
    _check_inputs(name, W, H, dXXT, cfg)
    with torch.no_grad():
        if cfg.method == "rtn":
            return rtn_solver.solve(W, cfg)
        dXXT = dXXT if cfg.method == "gptaq" else None
        backend = resolve_backend(cfg.backend, W, name)
        if backend == "reference":
            return reference.solve(name, W, H, dXXT, cfg)
        return blocked.solve(name, W, H, dXXT, cfg, backend)


def _config(cfg: SolverConfig | None, method: str, overrides: dict[str, Any]) -> SolverConfig:
    return (cfg or SolverConfig()).replace(method=method, **overrides)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: SolverConfig | None = None, *, name: str = "layer",
                  **overrides: Any) -> QuantResult:
    """GPTQ, min ||(Q - W) X~||^2 greedily: `quantize_linear` with cfg (default SolverConfig()) and `overrides` of
    its fields (bits=4, group_size=128, act_order=True, order="reverse", ...), method "gptq"."""
    return quantize_linear(W, H, None, _config(cfg, "gptq", overrides), name)


def gptaq_quantize(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, cfg: SolverConfig | None = None, *,
                   name: str = "layer", **overrides: Any) -> QuantResult:
    """GPTAQ, min ||Q X~ - W X||^2: as `gptq_quantize`, method "gptaq"; overrides may name GPTAQConfig's fields
    (alpha, variant "published" | "exact" | "p_term_only", form, precision) directly."""
    return quantize_linear(W, H, dXXT, _config(cfg, "gptaq", overrides), name)


def rtn_quantize(W: torch.Tensor, cfg: SolverConfig | None = None, *, name: str = "layer",
                 **overrides: Any) -> QuantResult:
    """Round to nearest on the same grids (per channel or per group of consecutive columns), method "rtn"."""
    return quantize_linear(W, None, None, _config(cfg, "rtn", overrides), name)


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: SolverConfig | None = None, *, name: str = "layer",
         **overrides: Any) -> torch.Tensor:
    """`gptq_quantize(...).weight`: the fake-quantized W, float32, same shape."""
    return gptq_quantize(W, H, cfg, name=name, **overrides).weight


def gptaq(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, cfg: SolverConfig | None = None, *,
          name: str = "layer", **overrides: Any) -> torch.Tensor:
    """`gptaq_quantize(...).weight`: the fake-quantized W, float32, same shape."""
    return gptaq_quantize(W, H, dXXT, cfg, name=name, **overrides).weight


def rtn(W: torch.Tensor, cfg: SolverConfig | None = None, *, name: str = "layer", **overrides: Any) -> torch.Tensor:
    """`rtn_quantize(...).weight`: the fake-quantized W, float32, same shape."""
    return rtn_quantize(W, cfg, name=name, **overrides).weight
