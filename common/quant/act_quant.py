"""Activation quantization: per-token (or per-group) dynamic quantizers and the linear-layer wrapper.

For each token row x (or each group of `groupsize` channels of it), the range is clipped,
xmin = c * min(min(x), 0), xmax = c * max(max(x), 0) with clip ratio c, and x is rounded to the b-bit
grid of `common.quant.grid` on that range.  The KV cache uses the same `ActQuantizer` per head and token.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from common.quant import act_triton
from common.quant.grid import check_bits, fake_quantize, grid_params

__all__ = ["ActQuantSettings", "ActQuantizer", "ActQuantLinear", "wrap_linears", "set_act_quant", "forget_shared"]


@dataclass(frozen=True)
class ActQuantSettings:
    """Per-token activation quantizers on the inputs of every block linear (--a_bits ...); an LLM's down_proj may
    differ (--int8_down_proj: 8 bits)."""

    bits: int = 16
    groupsize: int = -1
    sym: bool = False
    clip_ratio: float = 1.0
    down_proj_bits: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ActQuantizer(nn.Module):
    """Dynamic fake quantizer over the last dimension (per token), or per group of `groupsize` channels.

    bits >= 16 (the default) is the identity.  `enabled` switches it off without removing it.
    """

    def __init__(self, bits: int = 16, sym: bool = False, clip_ratio: float = 1.0, groupsize: int = -1):
        super().__init__()
        if bits < 16:
            check_bits(bits, "activation bits")
        if not 0.0 < clip_ratio <= 1.0:
            raise ValueError(f"clip ratio must be in (0, 1], got {clip_ratio}")
        self.bits, self.sym, self.clip_ratio, self.groupsize = bits, sym, clip_ratio, groupsize
        self.enabled = True
        self.fused = True  # use common.quant.act_triton where it applies (False: always the PyTorch code)

    @property
    def active(self) -> bool:
        return self.enabled and self.bits < 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        shape, dtype = x.shape, x.dtype
        if self.groupsize > 0 and shape[-1] % self.groupsize:
            raise ValueError(f"activation group size {self.groupsize} does not divide {shape[-1]} channels")
        columns = self.groupsize if self.groupsize > 0 else shape[-1]
        if self.fused and act_triton.available(x, columns):  # the same values, one kernel (act_triton)
            return act_triton.fake_quantize_rows(x, columns, self.bits, self.sym, self.clip_ratio)
        if self.groupsize > 0:
            x = x.reshape(*shape[:-1], shape[-1] // self.groupsize, self.groupsize)
        xf = x.float()
        zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
        xmin = torch.minimum(xf.amin(dim=-1, keepdim=True), zero) * self.clip_ratio
        xmax = torch.maximum(xf.amax(dim=-1, keepdim=True), zero) * self.clip_ratio
        scale, zp = grid_params(xmin, xmax, self.bits, self.sym)
        return fake_quantize(xf, scale, zp, self.bits).to(dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}, groupsize={self.groupsize}"


class ActQuantLinear(nn.Module):
    """A linear layer whose input goes through an optional online transform, then an activation quantizer.

    forward(x) = linear(quantizer(pre_transform(x))).  `pre_transform` holds online rotations
    (e.g. QuaRot's Hadamard on the down_proj input, R4); the rotation code sets it.
    """

    def __init__(self, linear: nn.Linear, quantizer: ActQuantizer | None = None,
                 pre_transform: Callable[[torch.Tensor], torch.Tensor] | nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.quantizer = quantizer if quantizer is not None else ActQuantizer()
        self.pre_transform = pre_transform

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the weight actually sees: pre_transform then quantizer (shared with the other linears that
        read the same tensor, see `_quantize_shared`)."""
        if self.pre_transform is not None:
            x = self.pre_transform(x)
        return _quantize_shared(self.quantizer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.quantized_input(x))


class _LastQuantized:
    """The most recent (input, setting) -> output of `_quantize_shared`: one entry, the input held weakly."""

    input: weakref.ref | None = None
    key: tuple | None = None
    output: torch.Tensor | None = None


def _quantize_shared(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    """quantizer(x), computed once when consecutive linears read the same tensor with the same setting (q/k/v_proj,
    up/gate_proj): they get the same result object.  Exact: the quantizer is a deterministic function of x's
    values, and the memo holds only while x is the same, unmodified tensor (identity and `_version`).  One entry
    (at most one activation kept alive), and only without autograd; otherwise every call computes its own."""
    if not quantizer.active or torch.is_grad_enabled():
        return quantizer(x)
    key = (x._version, quantizer.bits, quantizer.sym, quantizer.clip_ratio, quantizer.groupsize, quantizer.fused)
    last = _LastQuantized
    if last.input is None or last.input() is not x or last.key != key:
        last.input, last.key, last.output = None, None, None  # free the old output before computing the new one
        last.output = quantizer(x)
        last.input, last.key = weakref.ref(x), key
    return last.output


def forget_shared() -> None:
    """Drop `_quantize_shared`'s memo (e.g. after a CUDA graph capture, whose buffers it would otherwise hold)."""
    _LastQuantized.input, _LastQuantized.key, _LastQuantized.output = None, None, None


def wrap_linears(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, ActQuantLinear]:
    """Replace every nn.Linear below `module` (not already wrapped, not skipped by name) by an ActQuantLinear.

    Returns {qualified name: wrapper}.  Idempotent.
    """
    wrapped: dict[str, ActQuantLinear] = {}
    for name, child in list(module.named_modules()):
        if isinstance(child, ActQuantLinear):
            wrapped[name] = child
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or skip(name):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        if isinstance(parent, ActQuantLinear):
            continue
        wrapper = ActQuantLinear(child)
        setattr(parent, attr, wrapper)
        wrapped[name] = wrapper
    return wrapped


def set_act_quant(module: nn.Module, enabled: bool) -> None:
    """Switch every ActQuantizer below `module` on or off."""
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled
