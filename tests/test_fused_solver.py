"""Backend dispatch, column-walk blocking and the triangular helpers of common/solvers.py; the Triton walk itself
through Triton's CPU interpreter (bench/check_fused.py --quick), skipped where triton is not importable.

GPU agreement of the compiled kernel is checked by bench/check_fused.py on the device (bench/RESULTS.md).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_solvers import agreement, make_problem, ref_exact_target, ref_gptaq_pform, ref_gptq

from common import fused_solver, solvers
from common.solvers import SolverError, gptaq, gptaq_quantize, gptq, gptq_quantize, resolve_backend

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def test_backend_dispatch_and_errors(monkeypatch):
    W, H, dXXT, _, _ = make_problem(20)
    assert resolve_backend("auto", W) == "torch"  # CPU tensor: the PyTorch walk
    assert gptq_quantize(W, H, bits=4).info["backend"] == "torch"
    assert gptaq_quantize(W, H, dXXT, bits=4, backend="torch").info["backend"] == "torch"
    with pytest.raises(SolverError, match="q_proj: backend must be one of auto, triton, torch, got 'cuda'"):
        gptq(W, H, bits=4, backend="cuda", name="q_proj")
    monkeypatch.setattr(fused_solver, "INTERPRET", False)
    with pytest.raises(SolverError, match="o_proj: backend='triton' needs"):
        gptaq(W, H, dXXT, bits=4, backend="triton", name="o_proj")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_triton_availability_reasons(monkeypatch):
    W = torch.ones(4, 4)
    monkeypatch.setattr(fused_solver, "INTERPRET", False)
    assert "CUDA" in fused_solver.unavailable_reason(W)
    monkeypatch.setattr(fused_solver, "INTERPRET", True)
    assert fused_solver.unavailable_reason(W) is None
    assert "float64" in fused_solver.unavailable_reason(W.double())
    assert resolve_backend("auto", W) == "torch"  # auto never picks the interpreter


@pytest.mark.parametrize("lazy,group,dynamic,width", [
    (128, -1, False, 128), (96, -1, False, 96), (1000, -1, False, 125), (128, 32, True, 32), (128, 32, False, 128),
    (256, 256, True, 128), (256, 256, False, 128), (384, 192, True, 96),
])
def test_walk_width_starts_every_group(lazy, group, dynamic, width):
    got = solvers._walk_width(lazy, group, dynamic)
    assert got == width and lazy % got == 0 and got <= solvers.MAX_WALK
    if dynamic:
        assert group % got == 0


def _upper(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64)) + n * torch.eye(n, dtype=torch.float64)


def test_triangular_helpers_match_dense_products():
    n = 23  # several panels of 5, the last one partial
    U = _upper(n, 0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(7, n, generator=g, dtype=torch.float64)
    D = torch.randn(n, n, generator=g, dtype=torch.float64)
    assert torch.allclose(solvers._upper_inverse(U, panel=5), torch.linalg.inv(U), atol=1e-12)
    assert torch.allclose(solvers._mm_upper(X, U, transpose=True, panel=5), X @ U.T, atol=1e-10)
    assert torch.allclose(solvers._mm_upper(X, U, transpose=False, panel=5), X @ U, atol=1e-10)
    strict = solvers._mm_upper(D, U, transpose=True, strict_upper_out=True, panel=5)
    assert torch.allclose(strict, torch.triu(D @ U.T, diagonal=1), atol=1e-10)
    P = solvers.asym_matrix(D, U, 0.25, panel=5)
    assert torch.allclose(P, 0.25 * torch.triu(D @ U.T, diagonal=1) @ U, atol=1e-10)
    assert torch.equal(P, torch.triu(P, diagonal=1))


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    _, H, _, _, _ = make_problem(21)
    H = H.double()
    U = solvers.inverse_cholesky(H, 0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diagonal(U) > 0).all())
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("exact", [False, True])
def test_small_panels_and_short_walks_keep_the_math(monkeypatch, exact):
    """Panels of 8 for the triangular products and walks of 8 columns inside lazy blocks of 32 (several walks per
    block, the P term of later walks in the block on the columns before rounding) still match the references."""
    monkeypatch.setattr(solvers, "PANEL", 8)
    monkeypatch.setattr(solvers, "MAX_WALK", 8)
    W, H, dXXT, _, _ = make_problem(22)
    for kw in (dict(bits=4), dict(bits=3, group_size=16, act_order=True)):
        Q = gptaq(W, H, dXXT, alpha=0.5, exact=exact, blocksize=32, **kw)
        ref_kw = dict(bits=kw["bits"], gs=kw.get("group_size", -1), act_order=kw.get("act_order", False))
        if exact:
            ref = ref_gptq(ref_exact_target(W, H, dXXT, 0.5, 0.01), H, **ref_kw)
        else:
            ref = ref_gptaq_pform(W, H, dXXT, alpha=0.5, blocksize=32, **ref_kw)
        assert agreement(Q, ref) >= 0.99
    assert agreement(gptq(W, H, bits=4, blocksize=32), ref_gptq(W, H, bits=4)) >= 0.99


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_triton_walk_in_interpreter_matches_torch_walk():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "check_fused.py"), "--quick"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "worst agreement" in out.stdout and "OK" in out.stdout


WALK_WITH_OFFSET = r"""
import torch
from common import fused_solver
from common.solvers import _walk_torch

g = torch.Generator().manual_seed(3)
rows, n, lazy = 6, 24, 32
U = torch.randn(n, n, generator=g).triu_(1) * 0.2 + torch.diag(torch.rand(n, generator=g) + 0.5)
P = torch.randn(n, n, generator=g).triu_(1) * 0.05
s = torch.rand(rows, 1, generator=g) * 0.2 + 0.1
S, Z = s.expand(rows, n), torch.full((rows, n), 7.0)
out = torch.randn(rows, 2 * lazy, generator=g)  # offset halves as the M form hands them over: strided views
C = (out[:, :n], out[:, lazy:lazy + n], s)
W0 = torch.randn(rows, n, generator=g)
res = []
for fn in (_walk_torch, fused_solver.walk):
    W1, E1, Q1, K1 = W0.clone(), torch.empty(rows, n), torch.empty(rows, n), torch.empty(rows, n)
    fn(W1, U, P, S, Z, 15, E1, Q1, C, K1)
    res.append((W1, E1, Q1, K1))
(Wt, Et, Qt, Kt), (Wk, Ek, Qk, Kk) = res
assert torch.equal(Kt, torch.round(Qt / s)), "torch walk: K1 = q / s"
assert torch.equal(Kk, torch.round(Kk)) and torch.equal(Kk, Kt), (Kk - Kt).abs().max()
for a, b in ((Wt, Wk), (Et, Ek), (Qt, Qk)):
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
c = (out[:, :n] + out[:, lazy:lazy + n]) * s  # offset = walking W0 + c triu(U) and handing back err - c
W2, E2, Q2 = W0 + c @ U, torch.empty(rows, n), torch.empty(rows, n)
_walk_torch(W2, U, P, S, Z, 15, E2, Q2)
assert torch.equal(Q2, Qt) and torch.allclose(E2 - c, Et, atol=1e-5), (E2 - c - Et).abs().max()
assert torch.allclose(W2, Wt, atol=1e-5)
print("OK")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_walk_offset_and_steps_in_interpreter():
    """The walk offset (GPTAQ's M form: c = (C1 + C2) s on strided views) and the integer-step output, in the Triton
    kernel against the PyTorch walk, and the PyTorch walk against walking W + c triu(U) without an offset."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", WALK_WITH_OFFSET], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
