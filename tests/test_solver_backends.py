"""The fast blocked solver (backend "torch": PyTorch column walk, M or P form) against the published loops
(backend "reference", common/solver/reference.py) for every option: the same codes on >= 99.9% of entries in float32,
and the same codes and weights in float64; and the group_fit "updated" rule against an independent float64 loop.

(The Triton walk is checked against the PyTorch walk in test_fused_solver.py, and on the GPU by bench/check_fused.py.)
"""
import pytest
import torch
from test_solvers import make_problem, ref_gptaq_pform, ref_gptq, rel_err

from common.solver import SolverConfig, quantize_linear

# grid and layout settings over 64 columns: per channel, groups smaller than the lazy block (several per block,
# the block-start rule matters), larger than the blocksize (lazy blocks of one group), static, act-order, reverse,
# a block wider than the layer and a narrower last block, group sizes that do not divide the 64 columns (a narrower
# last group: 24 -> 24/24/16, 40 -> 40/24) and GPTQModel's symmetric grid (sym_grid "gptq"; per channel or static:
# a group grid fitted at its block's start puts the weight that set amax on a rounding tie, +-(2^b - 1)/2 steps, which
# float32 rounding breaks either way, so float32 backends may part there; float64 decides it the same in all)
GRIDS = {
    "4b": dict(bits=4),
    "3b-sym": dict(bits=3, sym=True),
    "2b-mse": dict(bits=2, mse=True),
    "8b-act": dict(bits=8, act_order=True),
    "4b-g16-bs32": dict(bits=4, group_size=16, blocksize=32),
    "3b-g16-bs48-mse": dict(bits=3, group_size=16, blocksize=48, mse=True),
    "2b-g8-bs64-sym": dict(bits=2, group_size=8, blocksize=64, sym=True),
    "4b-g32-bs16": dict(bits=4, group_size=32, blocksize=16),
    "4b-g16-bs32-act": dict(bits=4, group_size=16, blocksize=32, act_order=True),
    "3b-g16-bs32-act-static": dict(bits=3, group_size=16, blocksize=32, act_order=True, static_groups=True),
    "4b-g16-bs64-static-mse": dict(bits=4, group_size=16, blocksize=64, static_groups=True, mse=True),
    "4b-act-reverse": dict(bits=4, act_order=True, order="reverse"),
    "3b-g16-bs32-reverse": dict(bits=3, group_size=16, blocksize=32, order="reverse"),
    "8b-g32-bs128-act-mse": dict(bits=8, group_size=32, blocksize=128, act_order=True, mse=True),
    "4b-bs24": dict(bits=4, blocksize=24),
    "no-rounding": dict(bits=16),
    "4b-g24-bs48": dict(bits=4, group_size=24, blocksize=48),
    "3b-g24-bs32-act-static": dict(bits=3, group_size=24, blocksize=32, act_order=True, static_groups=True),
    "4b-g40-bs16-act-sym": dict(bits=4, group_size=40, blocksize=16, act_order=True, sym=True),
    "3b-gptqsym": dict(bits=3, sym=True, sym_grid="gptq"),
    "4b-g40-bs16-act-static-gptqsym": dict(bits=4, group_size=40, blocksize=16, act_order=True, static_groups=True,
                                           sym=True, sym_grid="gptq"),
    "2b-g24-static-mse-gptqsym-reverse": dict(bits=2, group_size=24, static_groups=True, mse=True, sym=True,
                                              sym_grid="gptq", order="reverse"),
}
METHODS = {
    "gptq": dict(method="gptq"),
    "gptaq-m": dict(method="gptaq", alpha=0.5),
    "gptaq-p": dict(method="gptaq", alpha=0.5, form="p"),
    "exact": dict(method="gptaq", alpha=0.5, variant="exact"),
    "p_term_only": dict(method="gptaq", alpha=0.5, variant="p_term_only"),
}
PROBLEM = make_problem(31, rows=64, cols=64)


def code_agreement(a, b):
    if a.codes is None:  # no rounding: the weights themselves
        return float(((a.weight - b.weight).abs() <= 1e-4 * b.weight.abs().max()).double().mean())
    return float((a.codes == b.codes).double().mean())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grid", GRIDS)
def test_torch_backend_matches_reference(grid, method):
    W, H, dXXT, _, _ = PROBLEM
    cfg = SolverConfig(**GRIDS[grid]).replace(**METHODS[method])
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype) for t in (W, H, dXXT)]
        fast = quantize_linear(*args, cfg.replace(backend="torch"))
        ref = quantize_linear(*args, cfg.replace(backend="reference"))
        assert fast.info["backend"] == "torch" and ref.info["backend"] == "reference"
        for f in ("g_idx", "perm"):
            a, b = getattr(fast, f), getattr(ref, f)
            assert (a is None and b is None) or torch.equal(a, b), f
        if dtype == torch.float32:
            assert code_agreement(fast, ref) >= 0.999
        else:  # float64 solves: the same codes and grids, and weights equal to their float32 rounding
            assert code_agreement(fast, ref) == 1.0
            assert rel_err(fast.weight, ref.weight) < 1e-8
            for a, b in ((fast.scales, ref.scales), (fast.zeros, ref.zeros)):
                assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["gptq", "gptaq-m", "gptaq-p"])
def test_updated_group_fit_keeps_the_previous_rule(method):
    """group_fit="updated" (each group fitted on its columns as updated by every earlier column, the block's
    included) is the solver's previous behaviour: in float64 it matches an independent loop of that rule, the
    reference's "updated" option too, and it differs from the published block-start rule on groups of 16 in blocks
    of 64."""
    W, H, dXXT, _, _ = PROBLEM
    W, H, dXXT = W.double(), H.double(), dXXT.double()
    cfg = SolverConfig(bits=3, group_size=16, blocksize=64, act_order=True).replace(**METHODS[method])
    updated = quantize_linear(W, H, dXXT, cfg.replace(group_fit="updated", backend="torch"))
    kw = dict(bits=3, gs=16, blocksize=64, act_order=True, group_fit="updated")
    ref = ref_gptq if method == "gptq" else lambda *a, **k: ref_gptaq_pform(*a, dXXT, alpha=0.5, **k)
    assert rel_err(updated.weight, ref(W, H, **kw)) < 1e-6
    partial = cfg.replace(group_size=24, blocksize=48, group_fit="updated", backend="torch")  # groups 24/24/16
    assert rel_err(quantize_linear(W, H, dXXT, partial).weight, ref(W, H, **dict(kw, gs=24, blocksize=48))) < 1e-6
    assert torch.equal(updated.codes, quantize_linear(W, H, dXXT, cfg.replace(group_fit="updated",
                                                                              backend="reference")).codes)
    block_start = quantize_linear(W, H, dXXT, cfg.replace(backend="torch"))
    assert float((block_start.codes == updated.codes).double().mean()) < 0.95
