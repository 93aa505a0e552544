"""The fused MSE clip search (common.quant.mse_triton), run in Triton's CPU interpreter, picks the same grid as
common.quant.weight_grid's PyTorch loop: every convention (asymmetric, both symmetric grids), 2..8 bits, all-zero
rows, rows without negative entries, column slices (a group of a wider W, strided rows); and SolverConfig
routes the search to it only on its Triton backends.  Both grid kernels (this one and common.quant.act_triton's, which
share `act_triton.grid_params`) also compile for an sm_90 GPU here (no GPU needed), which the interpreter does not
check (it missed a loop-carried variable of another shape)."""
from __future__ import annotations

import pytest
import torch
from fixtures import HAVE_TRITON, run_in_triton_interpreter

from common.solver import SolverConfig

FUSED_VS_TORCH = r"""
import torch
from common.quant import mse_triton
from common.quant.weight_grid import fit_grid

g = torch.Generator().manual_seed(0)
W = torch.randn(24, 150, generator=g) * torch.rand(24, 1, generator=g) * 3
W[2] = 0  # all-zero row
W[5] = W[5].abs()  # no negative entry
W[7, :75] = 0  # a group of zeros in one row
for x in (W, W[:, 40:104], W[:, 75:]):  # whole rows, and column slices (strided)
    assert mse_triton.available(x)
    for bits, sym, sym_grid in ((4, False, "quarot"), (3, True, "quarot"), (4, True, "gptq"), (2, False, "quarot"),
                                (8, False, "quarot"), (3, True, "gptq")):
        ref = fit_grid(x, bits, sym, True, sym_grid=sym_grid)
        fused = fit_grid(x, bits, sym, True, sym_grid=sym_grid, fused=True)
        for a, b in zip(ref, fused):
            assert torch.equal(a, b), (tuple(x.shape), bits, sym, sym_grid, int((a != b).sum()))
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_fused_mse_search_picks_pytorchs_grid_in_interpreter():
    run_in_triton_interpreter(FUSED_VS_TORCH)


def test_solver_config_fuses_the_search_only_on_triton_backends(monkeypatch):
    from common.quant import weight_grid

    seen = []
    monkeypatch.setattr(weight_grid.mse_triton, "available", lambda x: seen.append(True) or False)
    x = torch.randn(4, 32)
    for backend in ("reference", "torch", "auto"):  # auto on a CPU tensor: the PyTorch loop
        SolverConfig(method="gptq", bits=4, mse=True, backend=backend).fit_grid(x)
    assert not seen
    SolverConfig(method="gptq", bits=4, mse=True, backend="triton").fit_grid(x)
    assert seen == [True]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_grid_kernels_compile_for_sm90():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from common.quant import act_triton, mse_triton

    target = GPUTarget("cuda", 90, 32)
    ptr, i32, f32 = "*fp32", "i32", "fp32"
    sig = dict(X=ptr, XMIN=ptr, XMAX=ptr, PS=ptr, SCALE=ptr, ZERO=ptr, cols=i32, stride_r=i32, stride_c=i32,
               steps=i32, maxq=f32, half=f32, inv_div=f32, norm=f32)
    for sym, gptq_sym in ((False, False), (True, False), (True, True)):
        const = dict(SYM=sym, GPTQ_SYM=gptq_sym, RECIP=True, POWF=True, BLOCK_P=128, BLOCK_C=32)
        src = ASTSource(fn=mse_triton._mse_rows, signature={**sig, **dict.fromkeys(const, "constexpr")},
                        constexprs=const)
        assert "ptx" in triton.compile(src, target=target).asm
    sig = dict(X="*fp16", Y="*fp16", rows=i32, cols=i32, clip=f32, maxq=f32, half=f32, inv_div=f32)
    for sym in (False, True):
        const = dict(SYM=sym, RECIP=True, BLOCK_R=1, BLOCK_C=4096)
        src = ASTSource(fn=act_triton._fake_quant_rows, signature={**sig, **dict.fromkeys(const, "constexpr")},
                        constexprs=const)
        assert "ptx" in triton.compile(src, target=target).asm
