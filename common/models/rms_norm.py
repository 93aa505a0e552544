"""RMSNorm as one Triton kernel: y = g * (x / sqrt(mean(x^2) + eps)), the formula of Llama-family decoders.

Hugging Face's RMSNorm runs it as eight PyTorch kernels (float32 copy, square, mean, + eps, rsqrt, product, cast,
scale), ~0.13 ms for 2048 x 4096 float16 on an H200; the kernel reads each row once and writes it once (~0.03 ms),
with the same arithmetic: float32 sum of squares times 1/N, rsqrt, product, rounding to x's dtype (h), then the
scale g times h in float32, rounded to the promoted dtype.  Only the order of the float32 sum differs from
PyTorch's reduction, so h differs from Hugging Face's by at most one unit in the last place of x's dtype, and only
where its float32 value lies next to a rounding boundary (2e-5 of the entries of a 7B layer's input, bench/RESULTS.md
issue 18); the output by at most 2 eps |g h| (equal to h's difference for g = 1, as after QuaRot's norm fusion).
`use_fused_rms_norms(layer)` swaps the layer's RMSNorms whose forward is that formula (same weight Parameter, so
state dicts and saved checkpoints do not change); without CUDA / Triton, or where autograd needs the graph
(SpinQuant's rotation training), the module runs Hugging Face's PyTorch formula.
"""
from __future__ import annotations

import inspect
import os

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch formula
    triton = None

__all__ = ["FusedRMSNorm", "use_fused_rms_norms", "available"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's CPU interpreter (the tests)
_MAX_COLUMNS = 16384  # one row in registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The statements of the forward this module replaces (Hugging Face's LlamaRMSNorm and its copies in Qwen2/3,
# Mistral, Mixtral, Qwen2/3-MoE); a norm whose forward reads otherwise is left alone.
_FORMULA = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
_MATCHES: dict[type, bool] = {}


def available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel can take x [..., N] with scale `weight` [N]."""
    n = x.shape[-1] if x.dim() else 0
    on_device = x.is_cuda or (INTERPRET and x.device.type == "cpu")
    return (triton is not None and on_device and weight.device == x.device and x.dtype in _DTYPES
            and weight.dtype in _DTYPES and weight.shape == (n,) and 0 < n <= _MAX_COLUMNS and x.numel() > 0)


if triton is not None:
    @triton.jit
    def _rms_norm_rows(X, G, Y, N, eps, inv_n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) * inv_n + eps)
        h = (x * r).to(X.dtype.element_ty)  # hidden_states.to(input_dtype)
        g = tl.load(G + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (g * h.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _rms_norm_rows[(rows.shape[0],)](rows, weight, out, n, eps, 1.0 / n, BLOCK=triton.next_power_of_2(n),
                                     num_warps=4 if n <= 4096 else 8)
    return out.view(x.shape)


class FusedRMSNorm(nn.Module):
    """A Llama-family RMSNorm (same `weight` Parameter and `variance_epsilon`) computed by one kernel on CUDA; where
    the kernel does not apply, the replaced class's own forward (the formula, in PyTorch)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self._torch_forward = type(norm).forward  # reads only self.weight and self.variance_epsilon (_FORMULA)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        needs_graph = torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)
        if not needs_graph and available(hidden_states, self.weight):
            return _rms_norm_triton(hidden_states, self.weight, self.variance_epsilon)
        return self._torch_forward(self, hidden_states)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _computes_formula(cls: type) -> bool:
    """Whether cls.forward is _FORMULA (its source, blank lines and docstring aside); False where it cannot be read."""
    if cls not in _MATCHES:
        try:
            lines = [ln.strip() for ln in inspect.getsource(cls.forward).splitlines()[1:]]
        except (OSError, TypeError):
            lines = []
        body = tuple(ln for ln in lines if ln and not ln.startswith(('"""', "#")))
        _MATCHES[cls] = body == _FORMULA
    return _MATCHES[cls]


def use_fused_rms_norms(module: nn.Module) -> int:
    """Replace every RMSNorm inside `module` whose forward is the Llama formula by a FusedRMSNorm sharing its
    weight; returns how many were replaced (0 for other norms, e.g. Gemma's (1 + g) scale or LayerNorm)."""
    targets = [(name, m) for name, m in module.named_modules()
               if name and hasattr(m, "weight") and hasattr(m, "variance_epsilon") and _computes_formula(type(m))]
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, FusedRMSNorm(m))
    return len(targets)
