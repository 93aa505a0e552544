"""Backend dispatch, column-walk blocking and the triangular helpers of common/solver/blocked.py and linalg.py; the
Triton walk itself through Triton's CPU interpreter (bench/check_fused.py --quick: Triton vs the PyTorch walk and both
vs the published loop), skipped where triton is not importable.

GPU agreement of the compiled kernel is checked by bench/check_fused.py on the device (bench/RESULTS.md).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import run_in_triton_interpreter
from test_solvers import make_problem

from common.solver import SolverConfig, SolverError, gptaq, gptaq_quantize, gptq_quantize, resolve_backend
from common.solver import blocked, linalg, reference
from common.solver import triton_walk

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(triton_walk.INTERPRET, reason="the Triton interpreter runs the kernel on CPU tensors")
def test_backend_dispatch_and_errors():
    W, H, dXXT, _, _ = make_problem(20)
    assert resolve_backend("auto", W) == "torch"  # CPU tensor: the PyTorch walk
    assert resolve_backend("reference", W) == "reference"
    assert gptq_quantize(W, H, bits=4).info["backend"] == "torch"
    assert gptaq_quantize(W, H, dXXT, bits=4, backend="torch").info["backend"] == "torch"
    assert gptaq_quantize(W, H, dXXT, bits=4, backend="reference").info["backend"] == "reference"
    with pytest.raises(SolverError, match="o_proj: backend='triton' needs"):
        gptaq(W, H, dXXT, bits=4, backend="triton", name="o_proj")
    if HAVE_TRITON:
        assert "CUDA" in triton_walk.unavailable_reason(W)


@pytest.mark.parametrize("lazy,group,between,width", [
    (128, -1, False, 128), (96, -1, False, 96), (1000, -1, False, 125), (128, 32, True, 32), (128, 32, False, 128),
    (256, 256, True, 128), (256, 256, False, 128), (384, 192, True, 96),
])
def test_walk_width_starts_every_group(lazy, group, between, width):
    got = blocked._walk_width(lazy, group, between, blocked.MAX_WALK)
    assert got == width and lazy % got == 0 and got <= blocked.MAX_WALK
    if between:  # group_fit "updated": grids are fitted between walks, so every group starts one
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
    kw = dict(panel=5, mode="float32")  # "float32": plain products (float64 here)
    assert torch.allclose(linalg.upper_inverse(U, panel=5), torch.linalg.inv(U), atol=1e-12)
    assert torch.allclose(linalg.mm_upper(X, U, transpose=True, **kw), X @ U.T, atol=1e-10)
    assert torch.allclose(linalg.mm_upper(X, U, transpose=False, **kw), X @ U, atol=1e-10)
    strict = linalg.mm_upper(D, U, transpose=True, strict_upper_out=True, **kw)
    assert torch.allclose(strict, torch.triu(D @ U.T, diagonal=1), atol=1e-10)
    P = linalg.asym_matrix(D, U, 0.25, **kw)
    assert torch.allclose(P, 0.25 * torch.triu(D @ U.T, diagonal=1) @ U, atol=1e-10)
    assert torch.equal(P, torch.triu(P, diagonal=1))


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    _, H, _, _, _ = make_problem(21)
    H = H.double()
    U = linalg.inverse_cholesky(H, 0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    assert torch.equal(U, torch.triu(U)) and bool((torch.diagonal(U) > 0).all())
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)
    # the published route: cholesky -> cholesky_inverse -> upper cholesky
    published = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    assert torch.allclose(U, published, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("variant", ["published", "exact"])
@pytest.mark.parametrize("group_fit", ["block_start", "updated"])
def test_small_panels_and_short_walks_keep_the_math(variant, group_fit):
    """Panels of 8 for the triangular products and walks of 8 columns inside lazy blocks of 32 (several walks per
    block, the P term of later walks in the block on the columns before rounding) give the published loop's codes:
    all of them in float64, >= 99.9% in float32."""
    W, H, dXXT, _, _ = make_problem(22, rows=64)
    for kw in (dict(bits=4), dict(bits=3, group_size=16, act_order=True), dict(bits=4, group_size=24, sym=True),
               dict(bits=3, group_size=24, static_groups=True, sym=True, sym_grid="gptq")):
        for method, form in (("gptq", "m"), ("gptaq", "m"), ("gptaq", "p")):
            cfg = SolverConfig(method=method, blocksize=32, group_fit=group_fit, **kw).replace(
                alpha=0.5, variant=variant, form=form)
            D = dXXT if method == "gptaq" else None
            for dtype in (torch.float32, torch.float64):
                args = [t.to(dtype) if t is not None else None for t in (W, H, D)]
                fast = blocked.solve("layer", *args, cfg, "torch", panel=8, max_walk=8)
                ref = reference.solve("layer", *args, cfg)
                agree = float((fast.codes == ref.codes).double().mean())
                assert agree >= (0.999 if dtype == torch.float32 else 1.0), (kw, method, form, dtype)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", ["split", "float32"])
def test_cross_term_products_have_float32_accuracy(per_channel, mode):
    """The M form's products, the walk offset c_J = Q[:, :j1] M[:j1, J] and (Err - c_J) - Q_J M[J, J], against float64.
    Split TF32 runs on the CPU as float32 products of TF32-representable parts (three-part products, or integer
    codes times a row scale); a last block narrower than the others is included (n = 40, blocks of 16)."""
    g = torch.Generator().manual_seed(7)
    rows, n, lazy = 12, 40, 16
    scale = torch.rand(rows, 1, generator=g) * 0.1 + 0.01
    Q = scale * torch.randint(-8, 8, (rows, n), generator=g).float() if per_channel else torch.randn(rows, n, generator=g)
    M = torch.randn(n, n, generator=g).triu_(1)
    U = torch.randn(n, n, generator=g).triu_()
    cross = blocked._CrossTerm(M, U, Q, lazy, mode, scale if per_channel else None)
    Md, Qd = M.double(), Q.double()
    for j1 in range(0, n, lazy):
        j2 = min(j1 + lazy, n)
        assert torch.allclose(cross.P_diag[j1 // lazy, :j2 - j1, :j2 - j1].double(), Md[j1:j2, j1:j2] @ U[j1:j2, j1:j2].double(),
                              rtol=1e-5, atol=1e-5)
        C = cross.before(j1, j2)
        if j1 == 0:
            assert C is None
        else:
            C1, C2, s = C
            c = C1 if C2 is None else C1 + C2
            c = c if s is None else c * s
            c_ref = Qd[:, :j1] @ Md[:j1, j1:j2]
            assert float((c.double() - c_ref).norm() / c_ref.norm()) < 1e-6
        steps = cross.steps(j1, j2)
        assert (steps is not None) == (per_channel and mode == "split")
        if steps is not None:  # the walk writes the block's integer steps q / s
            torch.round(Q[:, j1:j2] / scale, out=steps)
        err = torch.randn(rows, j2 - j1, generator=g)
        want = err.double() - Qd[:, j1:j2] @ Md[j1:j2, j1:j2]
        cross.after(j1, j2, err)
        assert float((err.double() - want).norm() / want.norm()) < 1e-6


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
def test_triton_walk_in_interpreter_matches_torch_walk_and_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "check_fused.py"), "--quick"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "worst agreement" in out.stdout and "OK" in out.stdout


WALK_WITH_OFFSET = r"""
import torch
from common.solver import triton_walk
from common.solver.blocked import _walk_torch

assert triton_walk.unavailable_reason(torch.ones(4, 4)) is None  # the interpreter takes CPU tensors
assert "float64" in triton_walk.unavailable_reason(torch.ones(4, 4, dtype=torch.float64))
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
for fn in (_walk_torch, triton_walk.walk):
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
    run_in_triton_interpreter(WALK_WITH_OFFSET)
