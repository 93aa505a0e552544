"""The fused per-token quantizer (common.quant.act_triton) equals ActQuantizer's PyTorch code bit for bit, run in
Triton's CPU interpreter; and linears reading the same tensor share one quantized input (act_quant._quantize_shared)."""
from __future__ import annotations


import pytest
import torch
from fixtures import HAVE_TRITON, run_in_triton_interpreter

from common.quant.act_quant import ActQuantizer, ActQuantLinear

FUSED_VS_TORCH = r"""
import torch
from common.quant import act_triton
from common.quant.act_quant import ActQuantizer

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16):  # (the interpreter truncates bfloat16 stores; on GPU: profile_e2e)
    x = (torch.randn(3, 5, 96, generator=g) * torch.rand(96, generator=g) * 4).to(dtype)
    x[0, 1] = 0  # an all-zero row: the asymmetric grid's [-1, 1] fallback
    x[1, 2] = x[1, 2].abs()  # a row without negative values
    for kw in (dict(bits=4, clip_ratio=0.9), dict(bits=4, sym=True), dict(bits=3, groupsize=32, clip_ratio=0.95),
               dict(bits=8), dict(bits=2, sym=True, groupsize=48)):
        q = ActQuantizer(**kw)
        assert act_triton.available(x, q.groupsize if q.groupsize > 0 else 96)
        fused = q(x)
        q.fused = False
        ref = q(x)
        assert fused.dtype == x.dtype and fused.shape == x.shape
        assert torch.equal(fused, ref), (dtype, kw, int((fused != ref).sum()))
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_fused_quantizer_matches_pytorch_bit_for_bit_in_interpreter():
    run_in_triton_interpreter(FUSED_VS_TORCH)


LAUNCH_CONFIGS = r"""
import torch
from common.quant import act_triton
from common.quant.act_quant import ActQuantizer

g = torch.Generator().manual_seed(1)
x = (torch.randn(7, 200, generator=g) * torch.rand(200, generator=g) * 4).half()  # 200: not a power of two
x[3] = x[3].abs()
for kw in (dict(bits=4, clip_ratio=0.9), dict(bits=4, sym=True)):
    q = ActQuantizer(**kw)
    q.fused = False
    ref = q(x)
    for cfg in (("rows", 1, 4), ("rows", 4, 2), ("chunks", 64, 2), ("chunks", 128, 4), ("chunks", 256, 1)):
        y = torch.empty_like(x)
        act_triton.launch(x, y, 200, kw["bits"], kw.get("sym", False), kw.get("clip_ratio", 1.0), cfg)
        assert torch.equal(y, ref), (cfg, kw, int((y != ref).sum()))
    act_triton.LAUNCH[200] = ("chunks", 64, 2)  # the table picks the kernel; the output stays the same
    try:
        assert torch.equal(act_triton.fake_quantize_rows(x, 200, kw["bits"], kw.get("sym", False),
                                                         kw.get("clip_ratio", 1.0)), ref)
    finally:
        del act_triton.LAUNCH[200]
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_every_launch_configuration_gives_the_same_bits_in_interpreter():
    """Whole rows per program or one row in chunks (read twice), any rows / chunk / warps: the PyTorch values."""
    run_in_triton_interpreter(LAUNCH_CONFIGS)


def test_linears_reading_one_tensor_share_its_quantized_copy():
    a, b = (ActQuantLinear(torch.nn.Linear(8, 4), ActQuantizer(bits=4)) for _ in range(2))
    c = ActQuantLinear(torch.nn.Linear(8, 4), ActQuantizer(bits=8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        qa, qb, qc = a.quantized_input(x), b.quantized_input(x), c.quantized_input(x)
        assert qa is qb and qc is not qa  # same setting: one result; another setting: its own
        assert torch.equal(qa, ActQuantizer(bits=4)(x)) and torch.equal(qc, ActQuantizer(bits=8)(x))
        x.mul_(2)  # modified in place: computed again
        assert torch.equal(a.quantized_input(x), ActQuantizer(bits=4)(x))
        y = x.clone()
        assert b.quantized_input(y) is not a.quantized_input(x)
    with torch.enable_grad():  # with autograd every call computes its own
        assert a.quantized_input(x) is not b.quantized_input(x)
