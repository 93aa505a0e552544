"""Time GPTQ, GPTAQ (M form and P form) and GPTAQ exact: the published loop, our PyTorch walk and the Triton walk.

Usage: python bench/solver.py [--shapes 4096x4096,11008x4096,4096x11008,8192x28672] [--repeats 3] [--json out.json]
On CUDA it uses the paper shapes (float32, TF32 off); without CUDA it uses small shapes (no Triton column) so it
finishes on a laptop.  Inputs are random and correlated (never zeros); timings are medians after one warm-up,
synchronized.  "The published loop" is backend="reference" (common/solver/reference.py: the published GPTQ / GPTAQ
layer loops, one column at a time; the P form's problem is the same, so it is timed once for both GPTAQ rows).

Floor = the solve's FLOPs over the float32 matmul rate measured in the same run (8192^3 product, TF32 off), with
FLOPs counted for the triangular algorithm (r x n weight, n inputs; a multiply-add is 2 FLOPs):
  GPTQ        Cholesky n^3/3 + triangular inverse n^3/3 + column updates r n^2             = 2n^3/3 + r n^2
  GPTAQ       + M = alpha triu_1(dXXT U^T) (n^3/3) + Q[:, :j1] M[:j1, J] per block (r n^2)  = n^3 + 2 r n^2
  GPTAQ P     + P = M U (two triangular products, n^3/3 each) + Q_blk P[blk, rest] (r n^2)  = 4n^3/3 + 2 r n^2
  GPTAQ exact GPTQ + W dXXT (2 r n^2) + (.) U^T U (r n^2 each)                             = 2n^3/3 + 5 r n^2
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
from common.solver import SolverConfig, quantize_linear  # noqa: E402
from common.solver.config import GPTAQ_PRECISIONS  # noqa: E402

GPU_SHAPES = "4096x4096,11008x4096,4096x11008,8192x28672"
CPU_SHAPES = "256x256,688x256,256x688"
METHODS = {  # label: SolverConfig fields
    "gptq": dict(method="gptq"),
    "gptaq": dict(method="gptaq"),
    "gptaq_pform": dict(method="gptaq", form="p"),
    "gptaq_exact": dict(method="gptaq", variant="exact"),
}


def make_inputs(rows: int, cols: int, device: torch.device, seed: int = 0):
    """W [rows, cols], H and dXXT from 2*cols correlated tokens with a few large channels (generated on `device`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = 2 * cols
    mix = torch.randn(cols, cols, generator=g, device=device) / cols**0.5
    X = mix @ torch.randn(cols, tokens, generator=g, device=device)
    del mix
    X[:8] *= 10.0
    Xt = X + 0.05 * torch.randn(cols, tokens, generator=g, device=device)
    H = 2 / tokens * Xt @ Xt.T
    X -= Xt
    dXXT = 2 / tokens * X @ Xt.T
    del X, Xt
    W = torch.randn(rows, cols, generator=g, device=device) * 0.02
    return W, H, dXXT


def timed(fn, device: torch.device, repeats: int) -> float:
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


def matmul_rate(device: torch.device) -> float:
    """Measured float32 matmul FLOP/s (TF32 off) on an 8192^3 product (1024^3 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def solve_flops(method: str, rows: int, n: int) -> float:
    """FLOPs of one solve, counted as in the module docstring."""
    base = 2 * n**3 / 3 + rows * n**2
    return {"gptq": base, "gptaq": base + n**3 / 3 + rows * n**2, "gptaq_pform": base + 2 * n**3 / 3 + rows * n**2,
            "gptaq_exact": base + 4 * rows * n**2}[method]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="comma-separated ROWSxCOLS (W is out x in)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=-1)
    p.add_argument("--act_order", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_reference", action="store_true", help="skip timing the published loop (backend reference)")
    p.add_argument("--asym_matmul", choices=GPTAQ_PRECISIONS, default=SolverConfig().gptaq.precision,
                   help="precision of GPTAQ's extra products on CUDA (GPTAQConfig.precision; default %(default)s)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    base = SolverConfig(bits=args.bits, group_size=args.group_size, act_order=args.act_order).replace(
        precision=args.asym_matmul)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    backends = ("torch", "triton") if device.type == "cuda" else ("torch",)
    rate = matmul_rate(device)
    rows_out = []
    for shape in shapes.split(","):
        r, c = (int(v) for v in shape.lower().split("x"))
        W, H, dXXT = make_inputs(r, c, device)
        for method, fields in METHODS.items():
            cfg = base.replace(**fields)
            row = dict(shape=f"{r}x{c}", method=method, flops=solve_flops(method, r, c))
            row["floor_s"] = row["flops"] / rate
            for b in backends:
                row[f"{b}_s"] = timed(lambda: quantize_linear(W, H, dXXT, cfg.replace(backend=b)), device,
                                      args.repeats)
            if args.no_reference:
                row["reference_s"] = float("nan")
            elif method == "gptaq_pform":  # the published loop has no M form: the same loop as "gptaq", timed once
                row["reference_s"] = next(x["reference_s"] for x in rows_out if x["shape"] == row["shape"]
                                          and x["method"] == "gptaq")
            else:
                row["reference_s"] = timed(lambda: quantize_linear(W, H, dXXT, cfg.replace(backend="reference")),
                                           device, args.repeats)
            best = row[f"{backends[-1]}_s"]
            row["speedup_vs_reference"] = row["reference_s"] / best
            row["over_floor"] = best / row["floor_s"]
            rows_out.append(row)
            print(f"  {row['shape']} {method}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                             if k.endswith("_s")), flush=True)
        del W, H, dXXT
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows_out:  # GPTAQ and exact against our GPTQ on the same shape and backend
        g = next(x for x in rows_out if x["shape"] == row["shape"] and x["method"] == "gptq")
        row["over_gptq"] = row[f"{backends[-1]}_s"] / g[f"{backends[-1]}_s"]
    result = dict(device=name, torch=torch.__version__, triton=_triton_version(), date=time.strftime("%Y-%m-%d"),
                  matmul_tflops=rate / 1e12, config=vars(args), results=rows_out)
    print(f"device: {name}, torch {torch.__version__}, triton {result['triton']}, bits {args.bits}, "
          f"group {args.group_size}, act_order {args.act_order}, float32 (GPTAQ's extra products: {args.asym_matmul}), "
          f"median of {args.repeats}; "
          f"float32 matmul {rate / 1e12:.2f} TFLOP/s")
    best = backends[-1]
    tri_head = "Triton walk s | " if best == "triton" else ""
    print(f"| shape (out x in) | method | published loop s | PyTorch walk s | {tri_head}speed-up vs published | "
          "/ our GPTQ | floor s | / floor |")
    print("|---|---|---|---|" + ("---|" if best == "triton" else "") + "---|---|---|---|")
    for row in rows_out:
        tri = f"{row['triton_s']:.3f} | " if best == "triton" else ""
        print(f"| {row['shape']} | {row['method']} | {row['reference_s']:.3f} | {row['torch_s']:.3f} | {tri}"
              f"{row['speedup_vs_reference']:.1f}x | {row['over_gptq']:.2f} | {row['floor_s']:.4f} | "
              f"{row['over_floor']:.1f}x |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.json)
    return result


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
