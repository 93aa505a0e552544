"""Time GPTQ, GPTAQ (P form) and GPTAQ exact on Llama-2-7B layer shapes.

Usage: python bench/solver.py [--shapes 4096x4096,11008x4096,4096x11008] [--repeats 3] [--json out.json]
On CUDA it uses the paper shapes (float32, TF32 off); without CUDA it uses small shapes so it finishes on a laptop.
Inputs are random and correlated (never zeros); timings are medians after one warm-up, synchronized.
The last column times bench/baseline_gptaq.py, a plain transcription of the published loop (per-channel runs only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.baseline_gptaq import baseline_solve  # noqa: E402
from common.solvers import gptaq, gptq  # noqa: E402

GPU_SHAPES = "4096x4096,11008x4096,4096x11008"
CPU_SHAPES = "256x256,688x256,256x688"


def make_inputs(rows: int, cols: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = 2 * cols
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = (mix @ torch.randn(cols, tokens, generator=g)).to(device)
    X[:8] *= 10.0
    Xt = X + 0.05 * torch.randn(cols, tokens, generator=g).to(device)
    H = 2 / tokens * Xt @ Xt.T
    dXXT = 2 / tokens * (X - Xt) @ Xt.T
    W = (torch.randn(rows, cols, generator=g) * 0.02).to(device)
    return W, H, dXXT


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="comma-separated ROWSxCOLS (W is out x in)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=-1)
    p.add_argument("--act_order", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    kw = dict(bits=args.bits, group_size=args.group_size, act_order=args.act_order)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    plain = args.group_size == -1 and not args.act_order  # the baseline transcription is per-channel only
    rows_out = []
    for shape in shapes.split(","):
        r, c = (int(v) for v in shape.lower().split("x"))
        W, H, dXXT = make_inputs(r, c, device)
        t_gptq = timed(lambda: gptq(W, H, **kw), device, args.repeats)
        t_p = timed(lambda: gptaq(W, H, dXXT, **kw), device, args.repeats)
        t_e = timed(lambda: gptaq(W, H, dXXT, exact=True, **kw), device, args.repeats)
        t_b = timed(lambda: baseline_solve(W, H, dXXT, args.bits), device, args.repeats) if plain else float("nan")
        rows_out.append(dict(shape=f"{r}x{c}", gptq_s=t_gptq, gptaq_s=t_p, gptaq_exact_s=t_e,
                             gptaq_over_gptq=t_p / t_gptq, exact_over_gptq=t_e / t_gptq, baseline_gptaq_s=t_b))
        del W, H, dXXT
    result = dict(device=name, torch=torch.__version__, config=vars(args), results=rows_out)
    print(f"device: {name}, torch {torch.__version__}, bits {args.bits}, group {args.group_size}, "
          f"act_order {args.act_order}, float32, TF32 off, median of {args.repeats}")
    print("| shape (out x in) | GPTQ s | GPTAQ s | GPTAQ exact s | GPTAQ/GPTQ | exact/GPTQ | published-loop GPTAQ s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows_out:
        print(f"| {row['shape']} | {row['gptq_s']:.3f} | {row['gptaq_s']:.3f} | {row['gptaq_exact_s']:.3f} | "
              f"{row['gptaq_over_gptq']:.2f} | {row['exact_over_gptq']:.2f} | {row['baseline_gptaq_s']:.3f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
