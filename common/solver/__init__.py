"""common.solver: GPTQ / GPTAQ / RTN layer solvers; config.py holds every setting and its default.

    api.py          quantize_linear (dispatch on cfg.method and cfg.backend), gptq / gptaq / rtn and their *_quantize
    reference.py    the published GPTQ / GPTAQ layer loops (backend "reference"), the definition the others follow
    blocked.py      the fast blocked solver (backends "torch" and "triton"): M form, fused column walk
    triton_walk.py  the column walk as one Triton kernel per block;  tf32.py: exact and split TF32 products
    linalg.py       H_d^-1 = U^T U, GPTAQ's M and P, triangular products, processing order, lazy block width
    rtn.py          round to nearest;  result.py: QuantResult, SolverError;  diagnostics.py: proxy_loss, babai_bound
"""
from common.solver.api import (gptaq, gptaq_quantize, gptq, gptq_quantize, quantize_linear, resolve_backend, rtn,
                               rtn_quantize)
from common.solver.config import ConfigError, GPTAQConfig, SolverConfig
from common.solver.diagnostics import babai_bound, proxy_loss
from common.solver.result import QuantResult, SolverError

__all__ = ["quantize_linear", "gptq_quantize", "gptaq_quantize", "rtn_quantize", "gptq", "gptaq", "rtn",
           "resolve_backend", "QuantResult", "SolverError", "proxy_loss", "babai_bound", "ConfigError", "GPTAQConfig",
           "SolverConfig"]
