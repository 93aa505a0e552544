"""Where one solve's GPU time goes: torch-profiler kernel totals for GPTQ and GPTAQ (M and P form) on one shape.

Usage: python bench/profile_solver.py [--shape 11008x4096] [--top 12] [--json out.json]
Inputs as in bench/solver.py (float32, TF32 off outside GPTAQ's extra products); one warm-up solve, then one profiled
solve per method.  Prints each method's wall time (one unprofiled solve), total CUDA kernel time, kernel launches and largest kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.solver import make_inputs  # noqa: E402
from common.solver import gptaq, gptq  # noqa: E402


def kernel_times(fn) -> tuple[float, float, list[tuple[str, float, int]]]:
    """(wall ms of an unprofiled call, total CUDA kernel ms, [(kernel, ms, calls)] largest first) of fn."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = 1e3 * (time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return wall, sum(r[1] for r in rows), rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="11008x4096")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/profile_solver.py needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    r, c = (int(v) for v in args.shape.split("x"))
    W, H, dXXT = make_inputs(r, c, torch.device("cuda"))
    out = {}
    for method, form in (("gptq", None), ("gptaq", "m"), ("gptaq_pform", "p")):
        fn = (lambda: gptq(W, H, bits=4)) if form is None else (lambda: gptaq(W, H, dXXT, bits=4, form=form))
        wall, total, rows = kernel_times(fn)
        launches = sum(n for _, _, n in rows)
        out[method] = dict(wall_ms=wall, total_ms=total, launches=launches,
                           kernels=[dict(name=k, ms=ms, calls=n) for k, ms, n in rows[:args.top]])
        print(f"{args.shape} {method}: wall {wall:.2f} ms, CUDA kernels {total:.2f} ms in {launches} launches")
        for k, ms, n in rows[:args.top]:
            print(f"  {ms:8.3f} ms  {n:5d}x  {k[:110]}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), shape=args.shape, results=out), f, indent=2)
        os.replace(tmp, args.json)
    return out


if __name__ == "__main__":
    main()
