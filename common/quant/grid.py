"""Uniform quantization grids shared by weights, activations and the KV cache.

Asymmetric b-bit grid:  maxq = 2^b - 1,  scale = (xmax - xmin) / maxq,  zero = round(-xmin / scale),
                        q = clamp(round(x / scale) + zero, 0, maxq),  x^ = scale * (q - zero).
Symmetric b-bit grid:   signed levels [-2^(b-1), 2^(b-1) - 1],  scale = max(|xmin|, xmax) / (2^(b-1) - 1),
                        q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1),  x^ = scale * q.
Symmetric codes are stored shifted by 2^(b-1) (unsigned, with zero = 2^(b-1)) so that both grids share
one dequantization formula x^ = scale * (q - zero).  The conventions follow the GPTQ/QuaRot reference code.
"""
from __future__ import annotations

import torch

__all__ = ["grid_params", "quantize_codes", "dequantize", "fake_quantize", "check_bits"]


def check_bits(bits: int, what: str = "bits") -> None:
    """Raise a ValueError unless 2 <= bits <= 8 (16 means 'not quantized' and is handled by callers)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{what} must be an integer in 2..8, got {bits!r}")


def grid_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (unsigned-code convention) for ranges [xmin, xmax] that already contain 0.

    Returns float tensors of the same shape as xmin.  An all-zero range uses [-1, 1].
    """
    if sym:
        half = 2 ** (bits - 1)
        amax = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5)
        scale = amax / (half - 1)
        zero = torch.full_like(scale, float(half))
        return scale, zero
    maxq = 2**bits - 1
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes in [0, 2^b - 1] (as a float tensor) of x on the grid (scale, zero)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x^ = scale * (q - zero)."""
    return scale * (q - zero)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x to the grid and map back: the 'fake-quantized' value."""
    return dequantize(quantize_codes(x, scale, zero, bits), scale, zero)
