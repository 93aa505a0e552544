"""Calibration capture: shared accumulators for linears with equal inputs, the FP stream's advance during the last
group's capture, the CPU path's one FP pass per block, and the TF32 splitting behind the CUDA products (checked here through its exact arithmetic)."""
from __future__ import annotations

import torch
from torch import nn

from common.pipeline import driver
from common.solver import tf32
from common.pipeline.hessian import HessianAccumulator


class _ThreeLinears(nn.Module):
    """a and c always read x; b reads x in the first forward and 2x afterwards (its inputs stop agreeing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        xb = x if self.calls == 0 else 2 * x
        self.calls += 1
        return self.a(x) + self.b(xb) + self.c(x)


def _reference(batches, asymmetric=False, fp=None):
    ref = HessianAccumulator(8, asymmetric=asymmetric)
    for i, x in enumerate(batches):
        ref.add(x, None if fp is None else fp[i])
    return ref


def test_equal_inputs_share_one_accumulator_and_split_when_they_stop_agreeing():
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    block = _ThreeLinears()
    stats = driver._capture_group(block, None, ["a", "b", "c"], xs, [], lambda blk, x: blk(x), "cpu", False)
    assert stats["a"] is stats["c"] and stats["b"] is not stats["a"]
    torch.testing.assert_close(stats["a"].H, _reference(xs).H, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["b"].H, _reference([xs[0], 2 * xs[1], 2 * xs[2]]).H, rtol=1e-6, atol=1e-7)
    assert stats["a"].nsamples == stats["b"].nsamples == 30


def test_asymmetric_capture_advances_the_fp_stream_in_the_same_pass():
    torch.manual_seed(1)
    xq = [torch.randn(2, 5, 8) for _ in range(2)]
    xfp = [x + 0.1 * torch.randn_like(x) for x in xq]
    block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fp_block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fp_block.load_state_dict(block.state_dict())
    with torch.no_grad():
        expected_out = [fp_block(x) for x in xfp]
        fp_in_1 = [fp_block[0](x) for x in xfp]
        q_in_1 = [block[0](x) for x in xq]
    got = {}
    stats = driver._capture_group(block, fp_block, ["1"], list(xq), list(xfp), lambda blk, x: blk(x), "cpu", True,
                                  advance_fp=lambda b, out: got.__setitem__(b, out))
    for b in range(2):
        torch.testing.assert_close(got[b], expected_out[b])
    ref = _reference(q_in_1, asymmetric=True, fp=fp_in_1)
    torch.testing.assert_close(stats["1"].dXXT, ref.dXXT, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["1"].H, ref.H, rtol=1e-5, atol=1e-6)


def test_recorded_fp_inputs_equal_the_per_group_fp_passes():
    """CPU GPTAQ: one FP pass per block records every group's FP inputs (`_record_fp_inputs`); the groups' captures
    then give exactly the sums of the per-group partial FP passes, and the FP stream the same advance."""
    torch.manual_seed(3)
    xq = [torch.randn(2, 5, 8) for _ in range(3)]
    xfp = [x + 0.1 * torch.randn_like(x) for x in xq]
    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    fp_block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    fp_block.load_state_dict(block.state_dict())
    groups, run = [["0"], ["2"], ["3"]], (lambda blk, x: blk(x))
    per_group_fp, recorded_fp = list(xfp), list(xfp)
    recorded = driver._record_fp_inputs(fp_block, [n for g in groups for n in g], recorded_fp, run, "cpu",
                                        torch.device("cpu"), False)
    for gi, group in enumerate(groups):
        last = gi == len(groups) - 1
        advance = (lambda b, out: per_group_fp.__setitem__(b, out)) if last else None
        want = driver._capture_group(block, fp_block, group, xq, per_group_fp, run, "cpu", True, advance)
        got = driver._capture_group(block, fp_block, group, xq, recorded_fp, run, "cpu", True, None, recorded)
        name = group[0]
        assert torch.equal(got[name].H, want[name].H) and torch.equal(got[name].dXXT, want[name].dXXT)
        with torch.no_grad():
            block[int(name)].weight.mul_(0.5)  # "solved": later groups see the changed quantized block
    assert all(not d for d in recorded)  # every recorded input was used and dropped
    for a, b in zip(recorded_fp, per_group_fp):
        assert torch.equal(a, b)


def test_clone_is_independent():
    acc = HessianAccumulator(4, asymmetric=True)
    x = torch.randn(6, 4)
    acc.add(x, x + 1)
    twin = acc.clone()
    twin.add(x, x)
    assert twin.nsamples == 12 and acc.nsamples == 6
    torch.testing.assert_close(acc.H, _reference_h(x))


def _reference_h(x):
    return (2 / x.shape[0]) * (x.double().t() @ x.double()).float()


def test_tf32_split_is_exact_and_hi_fits_tf32():
    torch.manual_seed(2)
    a = torch.randn(64, 48) * torch.logspace(-3, 3, 48)
    hi, lo = tf32.split(a)
    assert torch.equal(hi + lo, a)  # exact: lo = a - hi needs no rounding
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # hi has TF32's 10 mantissa bits only
    assert (lo.abs() <= hi.abs() * 2.0**-10).all()
    b = torch.randn(48, 32)
    c = torch.randn(64, 32)
    ref = c.double() - 0.5 * (a.double() @ b.double())
    out = tf32.addmm_split_(c.clone(), a, b, alpha=-0.5)  # on CPU the products run in float32
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
    fp16 = torch.randn(16, 8).half()
    assert torch.equal(tf32.split(fp16.float())[0], fp16.float())  # float16 values are TF32-representable
