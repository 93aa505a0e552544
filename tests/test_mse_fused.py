"""The fused MSE clip search (common.quant.mse_triton), run in Triton's CPU interpreter, picks the same grid as
common.quant.weight_grid's PyTorch loop: every convention (asymmetric, both symmetric grids), 2..8 bits, all-zero
rows, rows without negative entries, column slices (a group of a wider W, strided rows); and SolverConfig
routes the search to it only on its Triton backends."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.solver import SolverConfig

ROOT = Path(__file__).resolve().parents[1]

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

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
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", FUSED_VS_TORCH], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


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
