"""How close GPTAQ can come to GPTQ's time: the extra work no scheduling removes, timed on the solver's own code.

Usage: python bench/asym_floor.py [--shapes 4096x4096,11008x4096,4096x11008,8192x28672] [--repeats 3] [--json out.json]
GPTAQ's M form (common/solver/blocked.py) does everything GPTQ does, plus two products with float32 accumulation:
  M   = alpha triu_1(dXXT U^T)                      n^3/3 multiply-adds (`asym_cross`)
  c_J = Q[:, :j1] M[:j1, J] for every lazy block J   r n^2/2 multiply-adds (`_CrossTerm.before`)
For each GPTAQConfig.precision (GPTAQ_PRECISIONS) this times both (per-channel 4-bit codes, the default grid),
a whole GPTQ solve and a whole GPTAQ solve on the same random correlated inputs (bench/solver.py's), and reports
floor = (GPTQ + M + c_J) / GPTQ, with M and c_J at their GPU kernel time (torch profiler; host launches excluded):
the GPTAQ / GPTQ ratio if everything else GPTAQ adds (the walk's in-block P term, the r x 128 x 128 block products,
elementwise work, launches) were free.  Wall times are medians after a warm-up, synchronized.
Needs CUDA (TF32 exists only there).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.profile_solver import kernel_times  # noqa: E402
from bench.solver import GPU_SHAPES, make_inputs, timed  # noqa: E402
from common.io.results import write_json  # noqa: E402
from common.solver import SolverConfig, gptaq, gptq, tf32  # noqa: E402
from common.solver.blocked import _CrossTerm  # noqa: E402
from common.solver.config import GPTAQ_PRECISIONS  # noqa: E402
from common.solver.linalg import asym_cross, inverse_cholesky  # noqa: E402

DEFAULTS = SolverConfig()  # the solver's defaults: alpha, lazy block width, dampening
BITS = 4


def timed_ms(fn, repeats: int) -> float:
    """Median wall ms of fn after a warm-up, synchronized (bench/solver.py's `timed`)."""
    return 1e3 * timed(fn, torch.device("cuda"), repeats)


def kernel_ms(fn) -> float:
    """GPU kernel time (ms) of one call of fn, from the torch profiler (host launch time excluded)."""
    return kernel_times(fn)[1]


def extra_products(W: torch.Tensor, H: torch.Tensor, dXXT: torch.Tensor, mode: str, repeats: int) -> dict:
    """Wall and GPU-kernel ms of forming M and of all blocks' c_J in `mode`, as the solver runs them."""
    U = inverse_cholesky(H, DEFAULTS.percdamp)
    rows, n = W.shape

    def form_m():
        with tf32.tf32(mode != "float32"):
            return asym_cross(dXXT, U, DEFAULTS.gptaq.alpha, mode=mode)

    M = form_m()
    scale = (W.abs().amax(dim=1, keepdim=True) / 2 ** (BITS - 1)).clamp_min(1e-8)
    codes = torch.randint(-2 ** (BITS - 1), 2 ** (BITS - 1), W.shape, device=W.device).float()
    Q = scale * codes
    lazy = DEFAULTS.blocksize
    cross = _CrossTerm(M, U, Q, lazy, mode, scale if mode == "split" else None)
    if mode == "split":
        cross.a.copy_(codes)  # what the solve records after each block: the integer codes

    def all_c():
        for j1 in range(lazy, n, lazy):
            cross.before(j1, min(j1 + lazy, n))

    return dict(M_ms=timed_ms(form_m, repeats), c_ms=timed_ms(all_c, repeats), M_gpu_ms=kernel_ms(form_m),
                c_gpu_ms=kernel_ms(all_c))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=GPU_SHAPES, help="comma-separated ROWSxCOLS (W is out x in)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/asym_floor.py needs CUDA (the precisions it compares are CUDA's)")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows_out = []
    for shape in args.shapes.split(","):
        r, c = (int(v) for v in shape.lower().split("x"))
        W, H, dXXT = make_inputs(r, c, torch.device("cuda"))
        gptq_ms = timed_ms(lambda: gptq(W, H, bits=BITS), args.repeats)
        for mode in GPTAQ_PRECISIONS:
            row = dict(shape=shape, mode=mode, gptq_ms=gptq_ms,
                       gptaq_ms=timed_ms(lambda: gptaq(W, H, dXXT, bits=BITS, precision=mode), args.repeats),
                       **extra_products(W, H, dXXT, mode, args.repeats))
            row["floor_ratio"] = (gptq_ms + row["M_gpu_ms"] + row["c_gpu_ms"]) / gptq_ms
            row["measured_ratio"] = row["gptaq_ms"] / gptq_ms
            rows_out.append(row)
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
        del W, H, dXXT
        torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.repeats}")
    print("| shape (out x in) | extra products | GPTQ ms | M ms (GPU) | all c_J ms (GPU) | "
          "floor (GPTQ + M + c_J) / GPTQ | GPTAQ ms | GPTAQ / GPTQ |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows_out:
        print(f"| {row['shape']} | {row['mode']} | {row['gptq_ms']:.1f} | {row['M_ms']:.2f} ({row['M_gpu_ms']:.2f}) | "
              f"{row['c_ms']:.2f} ({row['c_gpu_ms']:.2f}) | {row['floor_ratio']:.3f} | {row['gptaq_ms']:.1f} | "
              f"{row['measured_ratio']:.2f} |")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  config=vars(args), results=rows_out)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
