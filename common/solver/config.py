"""The solver's configuration: one frozen object, the single home of every default.

`SolverConfig` says how each linear's weight W is quantized (grid, solver options, calibration order) and
`GPTAQConfig` holds GPTAQ's own part (alpha, variant, how the fast path forms and computes the asymmetric term).
Every default is what the published code does (IST-DASLab gptq, QuaRot, the GPTQv2 authors' code); our own
alternatives are explicit values, documented below.  The front ends build it from their flags
(`common.cli.flags`), the driver and the solvers receive it as an argument, and `to_dict` is what results.json
and the resume fingerprint record.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from common.quant.weight_grid import SYM_GRIDS, fit_grid

__all__ = ["ConfigError", "GPTAQConfig", "SolverConfig", "METHODS", "BACKENDS", "GROUP_FITS", "QUANT_ORDERS",
           "GPTAQ_VARIANTS", "GPTAQ_FORMS", "GPTAQ_PRECISIONS", "NO_QUANT_BITS", "SYM_GRIDS"]

NO_QUANT_BITS = 16  # bits=16 means "do not round": the solver only applies its (exact) corrections
METHODS = ("gptq", "gptaq", "rtn", "none")
# "reference": the published layer loops (common.solver.reference), the definition the fast paths are checked
# against; "torch": the blocked PyTorch solver; "triton": its column walk as one Triton kernel per block and the
# MSE clip search as one kernel (common.quant.mse_triton) (CUDA);
# "auto": Triton on CUDA when importable, else torch.
BACKENDS = ("auto", "triton", "torch", "reference")
# When a group's grid is fitted (group_size smaller than the lazy block, no static groups):
#   "block_start" (published): on W[:, g:g+group_size] as it stands when its lazy block starts (the in-block
#                 updates of the block's earlier columns are not yet in W),
#   "updated"     (ours): on the group's columns as updated by every earlier column, the block's included.
GROUP_FITS = ("block_start", "updated")
QUANT_ORDERS = ("auto", "w_first", "a_first")
# The symmetric weight grid (sym=True; common.quant.weight_grid), zero point 2^(b-1) in both:
#   "quarot" (QuaRot and the GPTAQ paper code): scale = amax / (2^(b-1) - 1),
#   "gptq"   (IST-DASLab GPTQ, GPTQModel's weight-only GPTQ / GPTAQ): scale = 2 amax / (2^b - 1).
# "published": the P form, W[:, i:] -= err_i U[i, i:] - w_i P[i, i:] (GPTQv2);
# "exact": GPTQ on the least-squares target V = W + alpha W dXXT H^-1 (ours);
# "p_term_only": the P term without GPTQ's error feedback (the paper's Table 5 ablation).
GPTAQ_VARIANTS = ("published", "exact", "p_term_only")
# How the fast path forms the cross-block term: "m" keeps M = alpha triu_1(dXXT U^T) and folds the term into
# GPTQ's trailing GEMM (n^3/3 + r n^2 extra work); "p" forms P = M U as published (2n^3/3 + r n^2).  Same
# result up to float rounding; p_term_only always uses P.
GPTAQ_FORMS = ("m", "p")
# GPTAQ's extra products on CUDA float32 (CPU and float64 always use plain products): "split" = three TF32
# products per float32 product (float32-level accuracy), "float32" = plain float32 GEMMs, "tf32" = one TF32
# product (fastest; 95.0-99.3% of codes equal a float64 solve's, bench/RESULTS.md).  The exact variant's target
# V = W + alpha W dXXT H^-1 (formed once per layer, three chained products) is plain float32 under "split" too:
# split TF32 keeps ~2^-21 of each product, which at 8 bits moved 1% of the codes (bench/RESULTS.md).
GPTAQ_PRECISIONS = ("split", "float32", "tf32")
SCALE_DTYPES = (None, "float16", "bfloat16")


class ConfigError(ValueError):
    """A configuration value out of range; `field` names it (the front ends map it to their flag)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class GPTAQConfig:
    """GPTAQ's part of the solver configuration (min ||Q X~ - W X||, dXXT = (2/N)(X - X~) X~^T)."""

    alpha: float = 0.25              # weight of the asymmetric term (the paper's default)
    variant: str = "published"       # see GPTAQ_VARIANTS
    form: str = "m"                  # fast path only, see GPTAQ_FORMS
    precision: str = "split"         # fast path on CUDA only, see GPTAQ_PRECISIONS

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError("alpha", f"expected a finite number, got {self.alpha!r}")
        if self.alpha < 0:
            raise ConfigError("alpha", f"expected a number >= 0, got {self.alpha}")
        _choice("variant", self.variant, GPTAQ_VARIANTS)
        _choice("form", self.form, GPTAQ_FORMS)
        _choice("precision", self.precision, GPTAQ_PRECISIONS)


@dataclass(frozen=True)
class SolverConfig:
    """How every linear's weight is quantized.

    method "gptq" | "gptaq" | "rtn" | "none"; bits 2..8 (16: no rounding); sym/asymmetric grid; sym_grid: the
    symmetric grid's convention (see SYM_GRIDS; needs sym); mse: MSE clip search of the grid; group_size (-1: one
    grid per output channel; a size that does not divide the input features leaves a narrower last group, as in
    the published code); act_order (columns by descending diag H);
    static_groups (every group grid from the unquantized W); percdamp (fraction of mean diag H added to the
    diagonal); blocksize (lazy batch width); order "forward" or "reverse" (Babai's nearest plane); group_fit (see
    GROUP_FITS); backend (see BACKENDS); scale_dtype ("float16": scales rounded as a GPTQ checkpoint stores
    them); quant_order "auto" (GPTQ w_first, GPTAQ a_first), "w_first" or "a_first": whether the activation
    quantizers are on while X~ is captured (the paper's Table 6); gptaq: GPTAQ's part.
    """

    method: str = "gptq"
    bits: int = NO_QUANT_BITS
    sym: bool = False
    sym_grid: str = "quarot"
    mse: bool = False
    group_size: int = -1
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128
    order: str = "forward"
    group_fit: str = "block_start"
    backend: str = "auto"
    scale_dtype: str | None = None
    quant_order: str = "auto"
    gptaq: GPTAQConfig = field(default_factory=GPTAQConfig)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
                2 <= self.bits <= 8 or self.bits == NO_QUANT_BITS):
            raise ConfigError("bits", f"expected an integer in 2..8 or {NO_QUANT_BITS} (not quantized), "
                                      f"got {self.bits!r}")
        _choice("sym_grid", self.sym_grid, SYM_GRIDS)
        if self.sym_grid != "quarot" and not self.sym:
            raise ConfigError("sym_grid", f"{self.sym_grid!r} is a symmetric grid convention; it needs sym=True")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ConfigError("group_size", f"expected -1 (no groups) or a positive integer, got {self.group_size!r}")
        if not isinstance(self.percdamp, (int, float)) or not (0.0 <= self.percdamp < math.inf):
            raise ConfigError("percdamp", f"expected a finite number >= 0, got {self.percdamp!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ConfigError("blocksize", f"expected a positive integer, got {self.blocksize!r}")
        _choice("order", self.order, ("forward", "reverse"))
        _choice("group_fit", self.group_fit, GROUP_FITS)
        _choice("backend", self.backend, BACKENDS)
        if isinstance(self.scale_dtype, torch.dtype):  # torch.float16 -> "float16" (the config stays JSON-ready)
            object.__setattr__(self, "scale_dtype", str(self.scale_dtype).removeprefix("torch."))
        _choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _choice("quant_order", self.quant_order, QUANT_ORDERS)
        if not isinstance(self.gptaq, GPTAQConfig):
            raise ConfigError("gptaq", f"expected a GPTAQConfig, got {type(self.gptaq).__name__}")
        if self.static_groups and self.group_size == -1:
            raise ConfigError("static_groups", "needs group_size > 0")

    # ------------------------------------------------------------------------------------------ derived

    @property
    def active(self) -> bool:
        """Weights are rounded at all (method not "none", bits < 16)."""
        return self.method != "none" and self.bits < NO_QUANT_BITS

    @property
    def needs_data(self) -> bool:
        """The method calibrates (GPTQ, GPTAQ): the driver captures H (and dXXT)."""
        return self.active and self.method in ("gptq", "gptaq")

    @property
    def asymmetric(self) -> bool:
        """GPTAQ: the driver also runs the full-precision stream and captures dXXT."""
        return self.active and self.method == "gptaq"

    @property
    def acts_during_capture(self) -> bool:
        """Activation quantizers on while calibrating (A->W) or off (W->A)."""
        if self.quant_order == "auto":
            return self.method == "gptaq"
        return self.quant_order == "a_first"

    @property
    def scale_torch_dtype(self) -> torch.dtype | None:
        return None if self.scale_dtype is None else getattr(torch, self.scale_dtype)

    def num_groups(self, cols: int) -> int:
        """Grids per output channel of a layer with `cols` input features: 1, or ceil(cols / group_size) (a last
        group narrower than the others where group_size does not divide cols, as in the published code)."""
        return 1 if self.group_size == -1 else -(-cols // self.group_size)

    def fit_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [rows, 1] of the rows of x on this configuration's grid (bits, sym, sym_grid, mse clip search,
        scales rounded to scale_dtype).  The Triton backends ("triton", "auto" on CUDA) run the MSE clip search as
        one kernel (same candidate grids; the errors summed in another order)."""
        fused = self.backend == "triton" or (self.backend == "auto" and x.is_cuda)  # the Triton backends
        return fit_grid(x, self.bits, self.sym, self.mse, self.scale_torch_dtype, self.sym_grid, fused)

    @property
    def label(self) -> str:
        """The method as results.json and run names spell it: none, rtn, gptq, gptaq, gptaq_exact,
        gptaq_p_term_only."""
        if not self.active:
            return "none"
        if self.method == "gptaq" and self.gptaq.variant != "published":
            return f"gptaq_{self.gptaq.variant}"
        return self.method

    # ------------------------------------------------------------------------------------------ building

    def replace(self, **changes: Any) -> "SolverConfig":
        """A copy with `changes`; GPTAQ's fields (alpha, variant, form, precision) may be given directly."""
        sub = {k: changes.pop(k) for k in [f.name for f in dataclasses.fields(GPTAQConfig)] if k in changes}
        if sub:
            changes["gptaq"] = dataclasses.replace(changes.get("gptaq", self.gptaq), **sub)
        unknown = set(changes) - {f.name for f in dataclasses.fields(SolverConfig)}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "not a solver setting")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field (GPTAQ's nested), JSON-ready: what results.json and the resume fingerprint record."""
        return dataclasses.asdict(self)
