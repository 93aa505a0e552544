"""GPTQ / GPTAQ solvers against independent float64 references written here, plus the properties they must have.

The GPTQ reference uses the OBS form (explicit H^-1 and its rank-1 downdate after each column), not the Cholesky
trick; the GPTAQ reference applies the published P-form updates column by column without lazy batching, with the
cross-block rule made explicit.  Inputs are random and correlated with a few large-magnitude channels.
"""
import logging
import math

import pytest
import torch

from common.hessian import HessianAccumulator
from common.solvers import (SolverError, babai_bound, gptaq, gptaq_quantize, gptq, gptq_quantize, proxy_loss, rtn,
                            rtn_quantize)


# ------------------------------------------------------------------------------------- independent references

def ref_grid(x, bits, sym, mse):
    """float64 per-row grid: returns (scale, zero) [rows, 1] following the documented conventions."""
    x = x.double()
    lo = x.min(1, keepdim=True).values.clamp(max=0)
    hi = x.max(1, keepdim=True).values.clamp(min=0)

    def params(lo, hi):
        if sym:
            s = torch.maximum(-lo, hi).clamp(min=1e-5) / (2 ** (bits - 1) - 1)
            return s, torch.full_like(s, 2.0 ** (bits - 1))
        both0 = (lo == 0) & (hi == 0)
        lo = torch.where(both0, -1.0, lo)
        hi = torch.where(both0, 1.0, hi)
        s = (hi - lo) / (2**bits - 1)
        return s, torch.round(-lo / s)

    scale, zero = params(lo, hi)
    if mse:
        best = None
        for i in range(80):
            p = 1 - i / 100
            s, z = params(p * lo, p * hi)
            err = (ref_fq(x, s, z, bits) - x).abs().pow(2.4).sum(1, keepdim=True)
            if best is None:
                best, scale, zero = err, s, z
            else:
                take = err < best
                best = torch.where(take, err, best)
                scale, zero = torch.where(take, s, scale), torch.where(take, z, zero)
    return scale, zero


def ref_fq(x, s, z, bits):
    return s * (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z)


def ref_order(H, act_order, order):
    n = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    return perm.flip(0) if order == "reverse" else perm


def ref_prepare(W, H, dXXT, percdamp):
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if dXXT is not None:
        dXXT = dXXT.double().clone()
        dXXT[:, dead] = 0
    Hd = H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    return W, H, Hd, dXXT


def ref_grids_for(Wcur, j, bits, sym, mse, gs, static, perm, static_grids, current):
    if gs == -1:
        return current
    if static_grids is not None:
        return static_grids[int(perm[j]) // gs]
    if j % gs == 0:
        return ref_grid(Wcur[:, j:j + gs], bits, sym, mse)
    return current


def ref_gptq(W, H, *, bits, sym=False, mse=False, gs=-1, act_order=False, static=False, percdamp=0.01,
             order="forward"):
    """OBS-form GPTQ in float64: explicit inverse Hessian and its downdate."""
    W, H, Hd, _ = ref_prepare(W, H, None, percdamp)
    static_grids = None
    if static and gs != -1:
        static_grids = [ref_grid(W[:, g:g + gs], bits, sym, mse) for g in range(0, W.shape[1], gs)]
    perm = ref_order(H, act_order, order)
    W, Hd = W[:, perm], Hd[perm][:, perm]
    Hinv = torch.linalg.inv(Hd)
    grid = ref_grid(W, bits, sym, mse) if gs == -1 else None
    n = W.shape[1]
    for j in range(n):
        grid = ref_grids_for(W, j, bits, sym, mse, gs, static, perm, static_grids, grid)
        q = ref_fq(W[:, j:j + 1], *grid, bits).flatten()
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        W[:, j] = q
    return W[:, torch.argsort(perm)]


def ref_gptaq_pform(W, H, dXXT, *, alpha, bits, blocksize, sym=False, mse=False, gs=-1, act_order=False,
                    static=False, percdamp=0.01, feedback=True):
    """Published P form, unlazy: in-block updates use the column before rounding, later blocks get its rounded value.
    feedback=False drops GPTQ's error term (the "P term only" ablation)."""
    W, H, Hd, dXXT = ref_prepare(W, H, dXXT, percdamp)
    static_grids = None
    if static and gs != -1:
        static_grids = [ref_grid(W[:, g:g + gs], bits, sym, mse) for g in range(0, W.shape[1], gs)]
    perm = ref_order(H, act_order, "forward")
    W, Hd, dXXT = W[:, perm], Hd[perm][:, perm], dXXT[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(Hd)).T  # upper, H^-1 = U^T U
    P = alpha * torch.triu(dXXT @ U.T, diagonal=1) @ U
    grid = ref_grid(W, bits, sym, mse) if gs == -1 else None
    n = W.shape[1]
    for j in range(n):
        grid = ref_grids_for(W, j, bits, sym, mse, gs, static, perm, static_grids, grid)
        w = W[:, j].clone()
        q = ref_fq(W[:, j:j + 1], *grid, bits).flatten()
        err = (w - q) / U[j, j]
        end = min((j // blocksize + 1) * blocksize, n)
        if feedback:
            W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
        W[:, j + 1:end] += torch.outer(w, P[j, j + 1:end])
        W[:, end:] += torch.outer(q, P[j, end:])
        W[:, j] = q
    return W[:, torch.argsort(perm)]


def ref_exact_target(W, H, dXXT, alpha, percdamp):
    W, H, Hd, dXXT = ref_prepare(W, H, dXXT, percdamp)
    return W + alpha * W @ dXXT @ torch.linalg.inv(Hd)


# ------------------------------------------------------------------------------------------------- data

def make_problem(seed, rows=48, cols=64, tokens=768, drift="linear"):
    """Correlated inputs X (cols x tokens) with a few large channels, and a quantized-model input X~ != X."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)
    X = mix @ torch.randn(cols, tokens, generator=g, dtype=torch.float64)
    X += 0.1 * torch.randn(cols, tokens, generator=g, dtype=torch.float64)
    X[[2, 11, 40]] *= torch.tensor([8.0, 5.0, 12.0], dtype=torch.float64).unsqueeze(1)
    if drift == "linear":  # propagated error from earlier quantized layers: a correlated perturbation
        Xt = (torch.eye(cols, dtype=torch.float64) + 0.05 * torch.randn(cols, cols, generator=g, dtype=torch.float64)) @ X
    else:
        Xt = X + 0.05 * X.std() * torch.randn(cols, tokens, generator=g, dtype=torch.float64)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.5
    W[:, 5] *= 4
    H = 2 / tokens * Xt @ Xt.T
    dXXT = 2 / tokens * (X - Xt) @ Xt.T
    return W.float(), H.float(), dXXT.float(), X, Xt


def agreement(Q, Qref):
    Q, Qref = Q.double(), Qref.double()
    tol = 1e-4 * Qref.abs().max()
    return float(((Q - Qref).abs() <= tol).double().mean())


def obj(W, Q, Xt):
    return float(((Q.double() - W.double()) @ Xt).pow(2).sum())


def asym_obj(W, Q, X, Xt):
    return float((Q.double() @ Xt - W.double() @ X).pow(2).sum())


CONFIGS = [
    dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=4, sym=True), dict(bits=3, mse=True),
    dict(bits=4, gs=16), dict(bits=3, gs=16, act_order=True), dict(bits=4, gs=16, act_order=True, static=True),
    dict(bits=2, sym=True, act_order=True), dict(bits=4, gs=32, mse=True, act_order=True),
]


def solver_kwargs(c):
    return dict(bits=c["bits"], sym=c.get("sym", False), mse=c.get("mse", False), group_size=c.get("gs", -1),
                act_order=c.get("act_order", False), static_groups=c.get("static", False))


def ref_kwargs(c):
    return dict(bits=c["bits"], sym=c.get("sym", False), mse=c.get("mse", False), gs=c.get("gs", -1),
                act_order=c.get("act_order", False), static=c.get("static", False))


# ------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_matches_float64_reference(cfg):
    W, H, _, _, _ = make_problem(1)
    Q = gptq(W, H, blocksize=16, **solver_kwargs(cfg))
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert agreement(Q, ref_gptq(W, H, **ref_kwargs(cfg))) >= 0.99


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptaq_pform_matches_float64_reference(cfg):
    W, H, dXXT, _, _ = make_problem(2)
    Q = gptaq(W, H, dXXT, alpha=0.25, blocksize=32, **solver_kwargs(cfg))
    bs = 32 if cfg.get("gs", -1) == -1 else max(1, 32 // cfg["gs"]) * cfg["gs"]
    ref = ref_gptaq_pform(W, H, dXXT, alpha=0.25, blocksize=bs, **ref_kwargs(cfg))
    assert agreement(Q, ref) >= 0.99


@pytest.mark.parametrize("cfg", CONFIGS[:2] + CONFIGS[6:8], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptaq_p_term_only_matches_float64_reference(cfg):
    W, H, dXXT, _, _ = make_problem(4)
    Q = gptaq(W, H, dXXT, alpha=0.5, p_term_only=True, blocksize=32, **solver_kwargs(cfg))
    bs = 32 if cfg.get("gs", -1) == -1 else max(1, 32 // cfg["gs"]) * cfg["gs"]
    ref = ref_gptaq_pform(W, H, dXXT, alpha=0.5, blocksize=bs, feedback=False, **ref_kwargs(cfg))
    assert agreement(Q, ref) >= 0.99
    assert agreement(Q, gptaq(W, H, dXXT, alpha=0.5, blocksize=32, **solver_kwargs(cfg))) < 0.9  # feedback matters


def test_gptaq_p_term_only_without_p_is_rtn():
    """alpha = 0 leaves no update at all: every column rounds on its own grid, as RTN does."""
    W, H, dXXT, _, _ = make_problem(5)
    for kw in (dict(bits=4), dict(bits=3, sym=True, mse=True), dict(bits=4, group_size=16)):
        Q = gptaq(W, H, dXXT, alpha=0.0, p_term_only=True, static_groups=kw.get("group_size", -1) > 0, **kw)
        assert torch.allclose(Q, rtn(W, **kw), rtol=0, atol=1e-6)
    with pytest.raises(SolverError, match="p_term_only"):
        gptaq(W, H, dXXT, exact=True, p_term_only=True, bits=4)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptaq_exact_matches_float64_reference(cfg):
    W, H, dXXT, _, _ = make_problem(3)
    Q = gptaq(W, H, dXXT, alpha=0.5, exact=True, **solver_kwargs(cfg))
    V = ref_exact_target(W, H, dXXT, 0.5, 0.01)
    assert agreement(Q, ref_gptq(V, H, **ref_kwargs(cfg))) >= 0.99


def test_reverse_order_matches_reference():
    W, H, _, _, _ = make_problem(4)
    Q = gptq(W, H, bits=3, order="reverse", act_order=True)
    assert agreement(Q, ref_gptq(W, H, bits=3, act_order=True, order="reverse")) >= 0.99


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_beats_rtn(bits, sym):
    W, H, _, _, Xt = make_problem(5)
    for kw in (dict(), dict(group_size=16), dict(act_order=True)):
        assert obj(W, gptq(W, H, bits=bits, sym=sym, **kw), Xt) < obj(W, rtn(W, bits=bits, sym=sym, **{
            k: v for k, v in kw.items() if k == "group_size"}), Xt)


@pytest.mark.parametrize("seed", [6, 7, 8])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptaq_beats_gptq_on_asymmetric_objective(seed, bits):
    W, H, dXXT, X, Xt = make_problem(seed)
    g = asym_obj(W, gptq(W, H, bits=bits), X, Xt)
    assert asym_obj(W, gptaq(W, H, dXXT, exact=True, alpha=1.0, bits=bits), X, Xt) < g
    assert asym_obj(W, gptaq(W, H, dXXT, alpha=0.25, bits=bits), X, Xt) < g


def test_no_rounding_gptq_returns_w_and_exact_lands_on_least_squares_target():
    W, H, dXXT, X, Xt = make_problem(9)
    assert torch.allclose(gptq(W, H, bits=16, percdamp=0.0), W, atol=1e-5)
    Vstar = W.double() @ X @ Xt.T @ torch.linalg.inv(Xt @ Xt.T)  # argmin_V ||V X~ - W X||
    Q = gptaq(W, H, dXXT, bits=16, alpha=1.0, exact=True, percdamp=0.0)
    assert float((Q.double() - Vstar).norm() / Vstar.norm()) < 1e-4


def test_quant_result_reconstructs_weight_and_codes_in_range():
    W, H, dXXT, _, _ = make_problem(10)
    results = [
        gptq_quantize(W, H, bits=3, group_size=16, act_order=True),
        gptq_quantize(W, H, bits=4, group_size=16, act_order=True, static_groups=True),
        gptaq_quantize(W, H, dXXT, bits=2, group_size=32, sym=True),
        gptaq_quantize(W, H, dXXT, bits=4, exact=True, act_order=True),
        rtn_quantize(W, bits=3, group_size=16, mse=True),
    ]
    for r in results:
        gi = r.g_idx.long()
        assert r.codes.dtype == torch.int32 and 0 <= r.codes.min() and r.codes.max() <= 2**r.bits - 1
        rebuilt = r.scales[:, gi] * (r.codes.float() - r.zeros[:, gi])
        assert torch.allclose(rebuilt, r.weight, atol=1e-6)
        assert torch.equal(r.zeros, r.zeros.round())
    static = results[1]
    assert torch.equal(static.g_idx.long(), torch.arange(W.shape[1]) // 16)
    dynamic = results[0]  # act-order groups follow the processing order
    assert torch.equal(dynamic.g_idx.long()[dynamic.perm], torch.arange(W.shape[1]) // 16)


def test_dead_inputs_are_zeroed():
    W, H, dXXT, _, _ = make_problem(11)
    H[7, :] = 0
    H[:, 7] = 0
    for Q in (gptq(W, H, bits=4), gptaq(W, H, dXXT, bits=4), gptaq(W, H, dXXT, bits=4, exact=True)):
        assert torch.all(Q[:, 7] == 0) and torch.isfinite(Q).all()


def test_babai_bound_holds_in_both_orders_without_clipping():
    W, H, _, _, _ = make_problem(12)
    checked = 0
    for order in ("forward", "reverse"):
        for bits in (2, 4, 8):
            r = gptq_quantize(W, H, bits=bits, order=order, act_order=True, percdamp=0.01)
            D = (r.weight - W).double()
            row_loss = torch.sum((D @ H.double()) * D, dim=1)
            bound = babai_bound(r, H, percdamp=0.01, per_row=True)
            clean = r.clipped == 0
            checked += int(clean.sum())
            assert torch.all(row_loss[clean] <= bound[clean] * (1 + 1e-5))
    assert checked >= 20


def test_proxy_loss_matches_direct_norms():
    W, H, dXXT, X, Xt = make_problem(13)
    Q = gptq(W, H, bits=3)
    n = X.shape[1]
    out = proxy_loss(W, Q, H, dXXT)
    assert math.isclose(out["loss"], 2 / n * obj(W, Q, Xt), rel_tol=1e-4)
    const = float((W.double() @ (X - Xt)).pow(2).sum())
    assert math.isclose(out["asym_loss"], 2 / n * (asym_obj(W, Q, X, Xt) - const), rel_tol=1e-3, abs_tol=1e-3)


def test_hessian_accumulation_over_batches_equals_one_shot():
    g = torch.Generator().manual_seed(14)
    X = torch.randn(5, 37, 24, generator=g)
    Xt = X + 0.1 * torch.randn(5, 37, 24, generator=g)
    acc = HessianAccumulator(24, asymmetric=True)
    for b in range(5):
        acc.add(Xt[b], X[b])
    flat, flat_t = X.reshape(-1, 24).double(), Xt.reshape(-1, 24).double()
    n = flat.shape[0]
    assert acc.nsamples == n
    assert torch.allclose(acc.H.double(), 2 / n * flat_t.T @ flat_t, rtol=1e-5, atol=1e-5)
    assert torch.allclose(acc.dXXT.double(), 2 / n * (flat - flat_t).T @ flat_t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="24 features"):
        acc.add(torch.randn(3, 25))


def test_rtn_matches_reference_grid():
    W, _, _, _, _ = make_problem(15)
    for sym in (False, True):
        for mse in (False, True):
            s, z = ref_grid(W, 3, sym, mse)
            assert agreement(rtn(W, bits=3, sym=sym, mse=mse), ref_fq(W.double(), s, z, 3)) == 1.0


def test_error_paths_name_layer_and_value(caplog):
    W, H, dXXT, _, _ = make_problem(16)
    with pytest.raises(SolverError, match="q_proj.*bits"):
        gptq(W, H, bits=1, name="q_proj")
    with pytest.raises(SolverError, match="bits"):
        gptaq(W, H, dXXT, bits=9)
    with pytest.raises(SolverError, match="group_size 24 does not divide the 64"):
        gptq(W, H, bits=4, group_size=24, name="mlp.down_proj")
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SolverError, match="down.*W has non-finite"):
        gptq(bad, H, bits=4, name="down")
    badH = H.clone()
    badH[1, 2] = float("inf")
    with pytest.raises(SolverError, match="H has non-finite"):
        gptq(W, badH, bits=4)
    with pytest.raises(SolverError, match="not positive definite"):
        gptq(W, -torch.eye(64), bits=4, name="neg")
    # rank-deficient PSD Hessian without dampening: retried with growing dampening, and logged
    low_rank = torch.randn(64, 8)
    with caplog.at_level(logging.WARNING):
        Q = gptq(W, low_rank @ low_rank.T, bits=4, percdamp=0.0, name="lowrank")
    assert torch.isfinite(Q).all() and "lowrank" in caplog.text
    with pytest.raises(SolverError, match=r"dXXT must be \[64, 64\]"):
        gptaq(W, H, dXXT[:10], bits=4)


def test_capture_inputs_hooks_accumulate_symmetric_and_asymmetric():
    from torch import nn

    from common.hessian import capture_inputs

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    xs = [torch.randn(2, 5, 16) for _ in range(3)]
    fp = [x + 0.1 * torch.randn_like(x) for x in xs]
    with capture_inputs({"lin": lin}) as stats:
        for x in xs:
            lin(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    assert torch.allclose(stats["lin"].H.double(), 2 / flat.shape[0] * flat.T @ flat, atol=1e-5)
    cap = capture_inputs({"lin": lin}, asymmetric=True)
    cap.fp_inputs["lin"] = fp
    with cap as stats:
        for x in xs:
            lin(x)
    flat_fp = torch.cat([x.reshape(-1, 16) for x in fp]).double()
    assert torch.allclose(stats["lin"].dXXT.double(), 2 / flat.shape[0] * (flat_fp - flat).T @ flat, atol=1e-5)
    assert not lin._forward_hooks  # hooks removed on exit


def test_asym_matmul_setting_is_checked_and_cpu_keeps_plain_products(monkeypatch):
    """ASYM_MATMUL picks the precision of GPTAQ's extra products on CUDA; on the CPU every choice gives the float32
    solve, and an unknown value is a SolverError."""
    from common import solvers

    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(32, 96, generator=g)
    X[1] += 0.9 * X[0]
    Xt = X + 0.1 * torch.randn(X.shape, generator=g)
    H, dXXT = (2 / 96) * Xt @ Xt.T, (2 / 96) * (X - Xt) @ Xt.T
    ref = gptaq(W, H, dXXT, bits=4)
    for mode in solvers.ASYM_MATMULS:
        monkeypatch.setattr(solvers, "ASYM_MATMUL", mode)
        assert torch.equal(gptaq(W, H, dXXT, bits=4), ref)
    monkeypatch.setattr(solvers, "ASYM_MATMUL", "bf16")
    with pytest.raises(SolverError, match="ASYM_MATMUL"):
        gptaq(W, H, dXXT, bits=4)


@pytest.mark.parametrize("cfg", CONFIGS + [dict(bits=16)], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptaq_m_form_equals_p_form_in_float64(cfg, monkeypatch):
    """The default M form (cross-block term folded into GPTQ's GEMM, P never formed) is the published P form
    rearranged: in float64 both give the same weights to rounding error, for every grid, group and order setting."""
    from common import solvers

    W, H, dXXT, _, _ = make_problem(5, rows=24, cols=96)
    kw = dict(alpha=0.5, blocksize=32, **solver_kwargs(cfg))
    q_m = gptaq(W.double(), H.double(), dXXT.double(), **kw)
    monkeypatch.setattr(solvers, "ASYM_FORM", "p")
    q_p = gptaq(W.double(), H.double(), dXXT.double(), **kw)
    assert float((q_m.double() - q_p.double()).norm() / q_p.double().norm()) < 1e-6  # weights come back float32
    monkeypatch.setattr(solvers, "ASYM_FORM", "q")
    with pytest.raises(SolverError, match="ASYM_FORM"):
        gptaq(W, H, dXXT, bits=4)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", ["split", "float32"])
def test_cross_term_products_have_float32_accuracy(per_channel, mode):
    """The M form's products, the walk offset c_J = Q[:, :j1] M[:j1, J] and (Err - c_J) - Q_J M[J, J], against float64.
    Split TF32 runs on the CPU as float32 products of TF32-representable parts (three-part products, or integer
    codes times a row scale); a last block narrower than the others is included (n = 40, blocks of 16)."""
    from common.solvers import _CrossTerm

    g = torch.Generator().manual_seed(7)
    rows, n, lazy = 12, 40, 16
    scale = torch.rand(rows, 1, generator=g) * 0.1 + 0.01
    Q = scale * torch.randint(-8, 8, (rows, n), generator=g).float() if per_channel else torch.randn(rows, n, generator=g)
    M = torch.randn(n, n, generator=g).triu_(1)
    U = torch.randn(n, n, generator=g).triu_()
    cross = _CrossTerm(M, U, Q, lazy, mode, scale if per_channel else None)
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
