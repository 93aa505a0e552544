"""Exact products on TF32 tensor cores.

A TF32 operand keeps 10 explicit mantissa bits, so every float16 and bfloat16 value is exactly representable, and
the tensor cores form each product exactly and accumulate in float32.  A float32 product whose inputs come from
float16/bfloat16 tensors (the calibration activations of an fp16/bf16 model) is therefore computed as accurately
in TF32 as in float32, about 8x faster.  Other float32 operands are split as a = hi + lo, hi = a with its low 13
mantissa bits cleared (TF32-representable); a @ b = hi @ b + lo @ b then loses only lo's low bits (~2^-21 |a|).
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["EXACT_DTYPES", "tf32", "split", "split_into", "addmm_split_"]

EXACT_DTYPES = (torch.float16, torch.bfloat16)  # dtypes whose float32 copies TF32 holds exactly
_LOW_BITS = 0x1FFF  # float32 mantissa bits that TF32 drops (23 - 10)


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """TF32 for CUDA float32 matmuls inside the block (legacy flag, which keeps torch's two TF32 settings in step)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (float32) = hi + lo exactly, hi TF32-representable (truncated mantissa), |lo| < 2^-10 |hi|."""
    hi = (a.view(torch.int32) & ~_LOW_BITS).view(torch.float32)
    return hi, a - hi


def split_into(a: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """`split` written into the float32 tensors hi and lo (views are fine), without temporaries."""
    torch.bitwise_and(a.view(torch.int32), ~_LOW_BITS, out=hi.view(torch.int32))
    torch.sub(a, hi, out=lo)


def addmm_split_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """c += alpha * a @ b (float32, CUDA) from three TF32 products, hi_a hi_b + hi_a lo_b + lo_a hi_b: float32-level
    accuracy (the dropped lo_a lo_b is below 2^-20 of the product) at tensor-core speed.  Call inside `tf32()`."""
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    c.addmm_(a_hi, b_hi, alpha=alpha)
    c.addmm_(a_hi, b_lo, alpha=alpha)
    return c.addmm_(a_lo, b_hi, alpha=alpha)
