"""The published loops (common/solver/reference.py) against independent float64 references written here, the public
API, and the properties the solvers must have.

The GPTQ reference uses the OBS form (explicit H^-1 and its rank-1 downdate after each column), not the Cholesky
trick; the GPTAQ reference applies the published P-form updates column by column without lazy batching, with the
cross-block rule made explicit.  Both fit a group's grid on the group's columns as they stand when its lazy block
starts (the published rule, group_fit "block_start") or as updated by every earlier column ("updated").  Grids are
fitted in float32, as the solvers' fit_grid does, and used in float64.  Inputs are random and correlated with a few
large-magnitude channels.  The fast backends are checked against reference.py in test_solver_backends.py.
"""
import logging
import math

import pytest
import torch

from common.pipeline.hessian import HessianAccumulator
from common.solver import (ConfigError, SolverConfig, SolverError, babai_bound, gptaq, gptaq_quantize, gptq,
                           gptq_quantize, proxy_loss, quantize_linear, rtn, rtn_quantize)


# ------------------------------------------------------------------------------------- independent references

def ref_grid(x, bits, sym, mse, sym_grid="quarot"):
    """Per-row grid (scale, zero) [rows, 1] following the documented conventions, fitted in float32; sym_grid
    "gptq": the asymmetric grid on [-amax, amax] (on [0, amax] for a row without negative entries, [-1, 1] for an
    all-zero row), zero 2^(b-1)."""
    x = x.float()
    lo = x.min(1, keepdim=True).values.clamp(max=0)
    hi = x.max(1, keepdim=True).values.clamp(min=0)

    def params(lo, hi):
        if sym and sym_grid == "gptq":
            amax = torch.maximum(-lo, hi)
            lo = torch.where(amax == 0, -1.0, torch.where(lo < 0, -amax, 0.0))
            hi = torch.where(amax == 0, 1.0, amax)
            s = (hi - lo) / (2**bits - 1)
            return s, torch.full_like(s, 2.0 ** (bits - 1))
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
    return scale.double(), zero.double()


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


def ref_lazy(blocksize, gs):
    """Lazy blocks: blocksize made a multiple of the group size (at least one group)."""
    return blocksize if gs == -1 else max(1, blocksize // gs) * gs


class RefGrids:
    """The grid of each column j (processing order): per channel, static groups, or a group's grid fitted at its
    first column on the block-start snapshot (group_fit "block_start") or the current weights ("updated")."""

    def __init__(self, W, perm, *, bits, sym, mse, gs, static, group_fit, lazy, sym_grid="quarot"):
        self.bits, self.sym, self.mse, self.gs, self.perm = bits, sym, mse, gs, perm
        self.group_fit, self.lazy, self.sym_grid = group_fit, lazy, sym_grid
        self.static = None
        if static and gs != -1:  # groups g, g + gs, ...: the last one narrower where gs does not divide the width
            Wo = W[:, torch.argsort(perm)]
            self.static = [ref_grid(Wo[:, g:g + gs], bits, sym, mse, sym_grid) for g in range(0, W.shape[1], gs)]
        self.current = ref_grid(W, bits, sym, mse, sym_grid) if gs == -1 else None
        self.start = None

    def at(self, W, j):
        if j % self.lazy == 0:
            self.start = W.clone()  # the weights as block j // lazy starts
        if self.gs == -1:
            return self.current
        if self.static is not None:
            return self.static[int(self.perm[j]) // self.gs]
        if j % self.gs == 0:
            src = self.start if self.group_fit == "block_start" else W
            self.current = ref_grid(src[:, j:j + self.gs], self.bits, self.sym, self.mse, self.sym_grid)
        return self.current


def ref_gptq(W, H, *, bits, blocksize, sym=False, mse=False, gs=-1, act_order=False, static=False, percdamp=0.01,
             order="forward", group_fit="block_start", sym_grid="quarot"):
    """OBS-form GPTQ in float64: explicit inverse Hessian and its downdate (bits 16: no rounding)."""
    W, H, Hd, _ = ref_prepare(W, H, None, percdamp)
    perm = ref_order(H, act_order, order)
    W, Hd = W[:, perm], Hd[perm][:, perm]
    Hinv = torch.linalg.inv(Hd)
    grids = RefGrids(W, perm, bits=bits, sym=sym, mse=mse, gs=gs, static=static, group_fit=group_fit,
                     lazy=ref_lazy(blocksize, gs), sym_grid=sym_grid) if bits < 16 else None
    for j in range(W.shape[1]):
        q = ref_fq(W[:, j], *(g.flatten() for g in grids.at(W, j)), bits) if grids else W[:, j].clone()
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        W[:, j] = q
    return W[:, torch.argsort(perm)]


def ref_gptaq_pform(W, H, dXXT, *, alpha, bits, blocksize, sym=False, mse=False, gs=-1, act_order=False,
                    static=False, percdamp=0.01, order="forward", group_fit="block_start", feedback=True,
                    sym_grid="quarot"):
    """Published P form, unlazy: in-block updates use the column before rounding, later blocks get its rounded value.
    feedback=False drops GPTQ's error term (the "P term only" ablation)."""
    W, H, Hd, dXXT = ref_prepare(W, H, dXXT, percdamp)
    perm = ref_order(H, act_order, order)
    W, Hd, dXXT = W[:, perm], Hd[perm][:, perm], dXXT[perm][:, perm]
    U = torch.linalg.cholesky(torch.linalg.inv(Hd)).T  # upper, H^-1 = U^T U
    P = alpha * torch.triu(dXXT @ U.T, diagonal=1) @ U
    lazy = ref_lazy(blocksize, gs)
    grids = RefGrids(W, perm, bits=bits, sym=sym, mse=mse, gs=gs, static=static, group_fit=group_fit,
                     lazy=lazy, sym_grid=sym_grid) if bits < 16 else None
    n = W.shape[1]
    for j in range(n):
        w = W[:, j].clone()
        q = ref_fq(w, *(g.flatten() for g in grids.at(W, j)), bits) if grids else w.clone()
        err = (w - q) / U[j, j]
        end = min((j // lazy + 1) * lazy, n)
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


def rel_err(Q, Qref):
    return float((Q.double() - Qref.double()).norm() / Qref.double().norm())


def obj(W, Q, Xt):
    return float(((Q.double() - W.double()) @ Xt).pow(2).sum())


def asym_obj(W, Q, X, Xt):
    return float((Q.double() @ Xt - W.double() @ X).pow(2).sum())


# grid settings; bs is the blocksize (groups of 16 in blocks of 32 or 48: the block-start rule matters; groups of 32
# in blocks of 16: lazy blocks of one group; groups of 24 or 40 on 64 columns: a narrower last group, 16 or 24 wide;
# sym_grid "gptq": GPTQModel's symmetric grid)
CONFIGS = [
    dict(bits=4), dict(bits=3), dict(bits=2), dict(bits=4, sym=True), dict(bits=3, mse=True),
    dict(bits=4, gs=16), dict(bits=3, gs=16, act_order=True), dict(bits=4, gs=16, act_order=True, static=True),
    dict(bits=2, sym=True, act_order=True), dict(bits=4, gs=32, mse=True, act_order=True),
    dict(bits=3, gs=16, bs=48, mse=True), dict(bits=4, gs=32, bs=16), dict(bits=8, gs=16, order="reverse"),
    dict(bits=16),
    dict(bits=4, gs=24, bs=48), dict(bits=3, gs=24, act_order=True, static=True),
    dict(bits=4, gs=40, bs=16, sym=True, sym_grid="gptq", act_order=True),
    dict(bits=3, sym=True, sym_grid="gptq", mse=True),
    dict(bits=2, gs=24, sym=True, sym_grid="gptq", order="reverse"),
]


def cfg_id(c):
    return "-".join(f"{k}{v}" for k, v in c.items())


def solver_kwargs(c):
    return dict(bits=c["bits"], sym=c.get("sym", False), mse=c.get("mse", False), group_size=c.get("gs", -1),
                act_order=c.get("act_order", False), static_groups=c.get("static", False), blocksize=c.get("bs", 32),
                order=c.get("order", "forward"), sym_grid=c.get("sym_grid", "quarot"))


def ref_kwargs(c):
    return dict(bits=c["bits"], sym=c.get("sym", False), mse=c.get("mse", False), gs=c.get("gs", -1),
                act_order=c.get("act_order", False), static=c.get("static", False), blocksize=c.get("bs", 32),
                order=c.get("order", "forward"), sym_grid=c.get("sym_grid", "quarot"))


def f64(*ts):
    return [t.double() for t in ts]


# ------------------------------------------------------------------- reference.py vs the independent references

@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_reference_gptq_matches_independent_float64(cfg):
    W, H, _, _, _ = make_problem(1)
    want = ref_gptq(W, H, **ref_kwargs(cfg))
    Q = gptq(*f64(W, H), backend="reference", **solver_kwargs(cfg))
    assert Q.dtype == torch.float32 and Q.shape == W.shape
    assert rel_err(Q, want) < 1e-6  # every code equal; float32 output
    assert agreement(gptq(W, H, backend="reference", **solver_kwargs(cfg)), want) >= 0.99  # float32 solve


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_reference_gptaq_pform_matches_independent_float64(cfg):
    W, H, dXXT, _, _ = make_problem(2)
    want = ref_gptaq_pform(W, H, dXXT, alpha=0.25, **ref_kwargs(cfg))
    assert rel_err(gptaq(*f64(W, H, dXXT), alpha=0.25, backend="reference", **solver_kwargs(cfg)), want) < 1e-6
    assert agreement(gptaq(W, H, dXXT, alpha=0.25, backend="reference", **solver_kwargs(cfg)), want) >= 0.99


@pytest.mark.parametrize("cfg", CONFIGS[:2] + CONFIGS[6:8] + CONFIGS[10:11] + CONFIGS[14:15], ids=cfg_id)
def test_reference_p_term_only_matches_independent_float64(cfg):
    W, H, dXXT, _, _ = make_problem(4)
    kw = dict(alpha=0.5, backend="reference", **solver_kwargs(cfg))
    Q = gptaq(*f64(W, H, dXXT), variant="p_term_only", **kw)
    assert rel_err(Q, ref_gptaq_pform(W, H, dXXT, alpha=0.5, feedback=False, **ref_kwargs(cfg))) < 1e-6
    assert agreement(Q, gptaq(*f64(W, H, dXXT), **kw)) < 0.9  # the error feedback matters


@pytest.mark.parametrize("cfg", CONFIGS[:6] + CONFIGS[10:], ids=cfg_id)
def test_reference_exact_matches_independent_float64(cfg):
    W, H, dXXT, _, _ = make_problem(3)
    Q = gptaq(*f64(W, H, dXXT), alpha=0.5, variant="exact", backend="reference", **solver_kwargs(cfg))
    assert rel_err(Q, ref_gptq(ref_exact_target(W, H, dXXT, 0.5, 0.01), H, **ref_kwargs(cfg))) < 1e-6


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_reference_reverse_order_and_updated_rule_match_independent_float64(method):
    """Babai's order (reverse) with act-order, and group_fit "updated" (groups of 16 in blocks of 48)."""
    W, H, dXXT, _, _ = make_problem(4)
    for kw, ref_kw in ((dict(order="reverse", act_order=True, bits=3), dict(order="reverse", act_order=True, bits=3)),
                       (dict(group_fit="updated", group_size=16, bits=3), dict(group_fit="updated", gs=16, bits=3))):
        if method == "gptq":
            Q, want = gptq(*f64(W, H), blocksize=48, backend="reference", **kw), ref_gptq(W, H, blocksize=48, **ref_kw)
        else:
            Q = gptaq(*f64(W, H, dXXT), alpha=0.5, blocksize=48, backend="reference", **kw)
            want = ref_gptaq_pform(W, H, dXXT, alpha=0.5, blocksize=48, **ref_kw)
        assert rel_err(Q, want) < 1e-6


def test_group_fit_rules_differ_when_groups_are_smaller_than_the_block():
    """Groups of 16 in blocks of 64: the published rule fits later groups without the block's in-block updates."""
    W, H, dXXT, _, _ = make_problem(6)
    kw = dict(bits=3, group_size=16, blocksize=64, backend="reference")
    for solve in (lambda **k: gptq(W, H, **k), lambda **k: gptaq(W, H, dXXT, **k)):
        assert agreement(solve(**kw), solve(group_fit="updated", **kw)) < 0.95
        # one group per block: both rules fit the same weights
        assert torch.equal(solve(**dict(kw, blocksize=16)), solve(group_fit="updated", **dict(kw, blocksize=16)))


# ------------------------------------------------------------------------------------------------- properties

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
    assert asym_obj(W, gptaq(W, H, dXXT, variant="exact", alpha=1.0, bits=bits), X, Xt) < g
    assert asym_obj(W, gptaq(W, H, dXXT, alpha=0.25, bits=bits), X, Xt) < g


def test_gptaq_p_term_only_without_p_is_rtn():
    """alpha = 0 leaves no update at all: every column rounds on its own grid, as RTN does."""
    W, H, dXXT, _, _ = make_problem(5)
    for kw in (dict(bits=4), dict(bits=3, sym=True, mse=True), dict(bits=4, group_size=16)):
        for backend in ("torch", "reference"):
            Q = gptaq(W, H, dXXT, alpha=0.0, variant="p_term_only", backend=backend, **kw)
            assert torch.allclose(Q, rtn(W, **kw), rtol=0, atol=1e-6)


def test_no_rounding_gptq_returns_w_and_exact_lands_on_least_squares_target():
    W, H, dXXT, X, Xt = make_problem(9)
    Vstar = W.double() @ X @ Xt.T @ torch.linalg.inv(Xt @ Xt.T)  # argmin_V ||V X~ - W X||
    for backend in ("torch", "reference"):
        assert torch.allclose(gptq(W, H, bits=16, percdamp=0.0, backend=backend), W, atol=1e-5)
        Q = gptaq(W, H, dXXT, bits=16, alpha=1.0, variant="exact", percdamp=0.0, backend=backend)
        assert rel_err(Q, Vstar) < 1e-4
    assert torch.equal(rtn(W, bits=16), W)


def test_quant_result_reconstructs_weight_and_codes_in_range():
    W, H, dXXT, _, _ = make_problem(10)
    results = [
        gptq_quantize(W, H, bits=3, group_size=16, act_order=True),
        gptq_quantize(W, H, bits=4, group_size=16, act_order=True, static_groups=True),
        gptaq_quantize(W, H, dXXT, bits=2, group_size=32, sym=True),
        gptaq_quantize(W, H, dXXT, bits=4, variant="exact", act_order=True),
        gptaq_quantize(W, H, dXXT, bits=3, group_size=16, act_order=True, backend="reference"),
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
    for dynamic in (results[0], results[4]):  # act-order groups follow the processing order
        assert torch.equal(dynamic.g_idx.long()[dynamic.perm], torch.arange(W.shape[1]) // 16)
    assert [r.info["backend"] for r in results] == ["torch"] * 4 + ["reference", "rtn"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_partial_last_group_gets_its_own_grid(backend):
    """Groups of 24 on 64 columns are 24, 24 and 16 wide (ceil(64 / 24) grids per row, as the published loops and
    GPTQModel slice them): codes rebuild the weight, static groups fit the last grid on the last 16 original
    columns alone, RTN's last group is RTN of those columns, and a group wider than the layer is one grid per row."""
    W, H, dXXT, _, _ = make_problem(18)
    cols = W.shape[1]
    for kw in (dict(bits=4, sym=True, sym_grid="gptq"), dict(bits=3, mse=True)):
        static = gptq_quantize(W, H, bits=kw["bits"], group_size=24, act_order=True, static_groups=True,
                               backend=backend, **{k: v for k, v in kw.items() if k != "bits"})
        results = [static, gptaq_quantize(W, H, dXXT, group_size=24, act_order=True, backend=backend, **kw),
                   gptq_quantize(W, H, group_size=24, blocksize=48, backend=backend, **kw),
                   rtn_quantize(W, group_size=24, **kw)]
        for r in results:
            assert r.scales.shape == r.zeros.shape == (W.shape[0], 3)
            assert r.g_idx.bincount().tolist() == [24, 24, 16]
            gi = r.g_idx.long()
            assert torch.allclose(r.scales[:, gi] * (r.codes.float() - r.zeros[:, gi]), r.weight, atol=1e-6)
        assert torch.equal(static.g_idx.long(), torch.arange(cols) // 24)
        s, z = SolverConfig(group_size=24, **kw).fit_grid(W[:, 48:])
        assert torch.equal(static.scales[:, 2:], s) and torch.equal(static.zeros[:, 2:], z)
        assert torch.equal(results[3].weight[:, 48:], rtn(W[:, 48:], **kw))
        for wide in (64, 100):  # one group holding every column: the per-channel grid
            assert torch.equal(gptq(W, H, group_size=wide, backend=backend, **kw), gptq(W, H, backend=backend, **kw))
            assert torch.equal(rtn(W, group_size=wide, **kw), rtn(W, **kw))


def test_gptq_sym_grid_uses_every_code():
    """sym_grid "gptq" (GPTQModel's) spans [-amax, amax] with 2^b - 1 steps: more levels than QuaRot's grid, which
    leaves code 0 unused on a symmetric range; both keep the zero point at 2^(b-1) and beat RTN under GPTQ."""
    W, H, _, _, Xt = make_problem(19)
    for bits in (2, 3, 4):
        quarot = rtn_quantize(W, bits=bits, sym=True, group_size=16)
        full = rtn_quantize(W, bits=bits, sym=True, sym_grid="gptq", group_size=16)
        assert torch.all(full.zeros == 2 ** (bits - 1)) and torch.all(quarot.zeros == 2 ** (bits - 1))
        amax = W.abs().reshape(W.shape[0], 4, 16).amax(-1)
        assert torch.allclose(full.scales, 2 * amax / (2**bits - 1))
        assert torch.allclose(quarot.scales, amax / (2 ** (bits - 1) - 1))
        assert int(full.codes.min()) == 0 and int(quarot.codes.min()) == 1
        assert obj(W, gptq(W, H, bits=bits, sym=True, sym_grid="gptq", group_size=16), Xt) < obj(W, full.weight, Xt)


def test_dead_inputs_are_zeroed():
    W, H, dXXT, _, _ = make_problem(11)
    H[7, :] = 0
    H[:, 7] = 0
    for backend in ("torch", "reference"):
        for Q in (gptq(W, H, bits=4, backend=backend), gptaq(W, H, dXXT, bits=4, backend=backend),
                  gptaq(W, H, dXXT, bits=4, variant="exact", backend=backend)):
            assert torch.all(Q[:, 7] == 0) and torch.isfinite(Q).all()


def test_babai_bound_holds_in_both_orders_without_clipping():
    W, H, _, _, _ = make_problem(12)
    cfg = SolverConfig(method="gptq", act_order=True, percdamp=0.01)
    checked = 0
    for order in ("forward", "reverse"):
        for bits in (2, 4, 8):
            r = gptq_quantize(W, H, cfg, bits=bits, order=order)
            D = (r.weight - W).double()
            row_loss = torch.sum((D @ H.double()) * D, dim=1)
            bound = babai_bound(r, H, cfg, per_row=True)
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
    with pytest.raises(ValueError, match="24 features"):
        acc.add(torch.randn(3, 25), torch.randn(3, 25))
    flat, flat_t = X.reshape(-1, 24).double(), Xt.reshape(-1, 24).double()
    n = flat.shape[0]
    assert acc.nsamples == n
    assert torch.allclose(acc.H.double(), 2 / n * flat_t.T @ flat_t, rtol=1e-5, atol=1e-5)
    assert torch.allclose(acc.dXXT.double(), 2 / n * (flat - flat_t).T @ flat_t, rtol=1e-5, atol=1e-5)


def test_rtn_matches_reference_grid():
    W, _, _, _, _ = make_problem(15)
    for sym in (False, True):
        for mse in (False, True):
            s, z = ref_grid(W, 3, sym, mse)
            assert agreement(rtn(W, bits=3, sym=sym, mse=mse), ref_fq(W.double(), s, z, 3)) == 1.0


# ------------------------------------------------------------------------------------------------- the API

def test_config_and_overrides_are_the_same_solve():
    """quantize_linear(W, H, dXXT, cfg) is what gptaq_quantize(W, H, dXXT, **fields) runs; a cfg plus overrides
    replaces just those fields; GPTQ ignores dXXT and RTN needs no statistics."""
    W, H, dXXT, _, _ = make_problem(17)
    cfg = SolverConfig(method="gptaq", bits=3, group_size=16, act_order=True).replace(alpha=0.5, form="p")
    a = quantize_linear(W, H, dXXT, cfg, name="q_proj")
    b = gptaq_quantize(W, H, dXXT, bits=3, group_size=16, act_order=True, alpha=0.5, form="p")
    c = gptaq_quantize(W, H, dXXT, SolverConfig(bits=4, group_size=16, act_order=True), bits=3, alpha=0.5, form="p")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight)
    g = SolverConfig(method="gptq", bits=3)
    assert torch.equal(quantize_linear(W, H, dXXT, g).weight, quantize_linear(W, H, None, g).weight)
    assert torch.equal(quantize_linear(W, None, None, g.replace(method="rtn")).weight, rtn(W, bits=3))
    assert torch.equal(gptq(W, H, cfg, bits=3, group_size=16, act_order=True),  # gptq() forces method "gptq"
                       gptq_quantize(W, H, bits=3, group_size=16, act_order=True).weight)


def test_precision_setting_keeps_plain_products_on_cpu():
    """GPTAQConfig.precision picks the precision of GPTAQ's extra products on CUDA; on the CPU every choice gives the
    float32 solve, and an unknown value is a ConfigError."""
    from common.solver.config import GPTAQ_PRECISIONS

    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 32, generator=g)
    X = torch.randn(32, 96, generator=g)
    X[1] += 0.9 * X[0]
    Xt = X + 0.1 * torch.randn(X.shape, generator=g)
    H, dXXT = (2 / 96) * Xt @ Xt.T, (2 / 96) * (X - Xt) @ Xt.T
    ref = gptaq(W, H, dXXT, bits=4)
    for precision in GPTAQ_PRECISIONS:
        assert torch.equal(gptaq(W, H, dXXT, bits=4, precision=precision), ref)
    with pytest.raises(ConfigError, match="precision"):
        gptaq(W, H, dXXT, bits=4, precision="bf16")
    with pytest.raises(ConfigError, match="form"):
        gptaq(W, H, dXXT, bits=4, form="q")


def test_error_paths_name_layer_and_value(caplog):
    W, H, dXXT, _, _ = make_problem(16)
    with pytest.raises(ConfigError, match="bits"):
        gptq(W, H, bits=1, name="q_proj")
    with pytest.raises(ConfigError, match="bits"):
        gptaq(W, H, dXXT, bits=9)
    with pytest.raises(ConfigError, match="backend"):
        gptq(W, H, bits=4, backend="cuda")
    with pytest.raises(ConfigError, match="sym_grid.*needs sym=True"):
        gptq(W, H, bits=4, sym_grid="gptq")
    with pytest.raises(ConfigError, match="sym_grid"):
        gptq(W, H, bits=4, sym=True, sym_grid="gptqmodel")
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SolverError, match="down.*W has non-finite"):
        gptq(bad, H, bits=4, name="down")
    badH = H.clone()
    badH[1, 2] = float("inf")
    with pytest.raises(SolverError, match="H has non-finite"):
        gptq(W, badH, bits=4)
    for backend in ("torch", "reference"):
        with pytest.raises(SolverError, match="neg: Hessian is not positive definite"):
            gptq(W, -torch.eye(64), bits=4, name="neg", backend=backend)
    # rank-deficient PSD Hessian without dampening: retried with growing dampening, and logged
    low_rank = torch.randn(64, 8)
    with caplog.at_level(logging.WARNING):
        Q = gptq(W, low_rank @ low_rank.T, bits=4, percdamp=0.0, name="lowrank")
    assert torch.isfinite(Q).all() and "lowrank" in caplog.text
    with pytest.raises(SolverError, match=r"dXXT must be \[64, 64\]"):
        gptaq(W, H, dXXT[:10], bits=4)
    with pytest.raises(SolverError, match="o_proj: gptaq needs dXXT"):
        quantize_linear(W, H, None, SolverConfig(method="gptaq", bits=4), name="o_proj")
    with pytest.raises(SolverError, match="gptq needs H"):
        quantize_linear(W, None, None, SolverConfig(method="gptq", bits=4))
    with pytest.raises(SolverError, match="method 'none'"):
        quantize_linear(W, H, None, SolverConfig(method="none"))
    with pytest.raises(SolverError, match="W must be 2-D"):
        rtn(W.flatten(), bits=4)
