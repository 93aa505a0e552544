"""Check the Triton column walk against the PyTorch walk: same codes on >= 99.9% of entries, every setting.

Usage: python bench/check_fused.py [--shape 2048x4096] [--quick] [--json out.json]
Runs GPTQ, GPTAQ (default M form) and GPTAQ exact with backend="triton" and backend="torch" on the same random correlated
inputs (bench/solver.py's) for per-channel and group grids (fitted at each group start or static), act-order,
sym/asym, MSE clip search, 2..4 bits and no rounding (bits=16: weights compared instead of codes), and exits with
status 1 if any agreement is below --min_agree.  On CUDA it also solves GPTAQ (P form and exact) with its extra
products in each precision of `common.solvers.ASYM_MATMULS` (split TF32, the default; float32; plain TF32), in the
M form, the published P form and exact, and compares each with a float64 solve (codes, asymmetric objective).
On a machine without CUDA run it under TRITON_INTERPRET=1 (small default shape; --quick keeps five representative
cases, as tests/test_fused_solver.py does).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.solver import make_inputs  # noqa: E402
from common import solvers  # noqa: E402
from common.solvers import gptaq_quantize, gptq_quantize, proxy_loss  # noqa: E402


def settings(group: int) -> list[tuple[str, dict]]:
    """(label, solver keywords); `group` is the group size used for the group settings."""
    g2 = group // 4  # groups smaller than the lazy block: several walks per block (sub-blocks)
    return [
        ("4b asym", dict(bits=4)),
        ("3b sym", dict(bits=3, sym=True)),
        ("2b asym", dict(bits=2)),
        ("4b mse", dict(bits=4, mse=True)),
        (f"4b g{group}", dict(bits=4, group_size=group)),
        (f"3b g{g2} bs{group}", dict(bits=3, group_size=g2, blocksize=group)),
        (f"4b g{group} act", dict(bits=4, group_size=group, act_order=True)),
        (f"4b g{g2} act static", dict(bits=4, group_size=g2, act_order=True, static_groups=True)),
        (f"3b g{g2} sym mse act", dict(bits=3, group_size=g2, sym=True, mse=True, act_order=True)),
        ("4b act reverse", dict(bits=4, act_order=True, order="reverse")),
        ("no rounding", dict(bits=16)),
    ]


QUICK = {"4b asym": "gptaq", "3b g{g2} bs{group}": "gptaq", "4b g{g2} act static": "gptq", "4b mse": "gptaq_exact",
         "no rounding": "gptaq"}  # --quick: (setting, method) pairs covering every kernel variant


def compare(W, H, dXXT, method: str, kw: dict) -> dict:
    if method == "gptq":
        a, b = (gptq_quantize(W, H, backend=be, **kw) for be in ("torch", "triton"))
    else:
        a, b = (gptaq_quantize(W, H, dXXT, exact=method == "gptaq_exact", backend=be, **kw)
                for be in ("torch", "triton"))
    assert b.info["backend"] == "triton"
    rel = float((a.weight - b.weight).norm() / a.weight.norm())
    if a.codes is None:  # no rounding: both land on the same weights up to float32 rounding
        agree = float(((a.weight - b.weight).abs() <= 1e-4 * a.weight.abs().max()).float().mean())
    else:
        agree = float((a.codes == b.codes).float().mean())
    return dict(method=method, agree=agree, rel_weight_diff=rel)


def precision_check(W, H, dXXT, kw: dict, exact: bool, form: str = "m") -> dict:
    """GPTAQ (cross-block term in `form`, see solvers.ASYM_FORM) with its extra products in each precision of
    solvers.ASYM_MATMULS, each against a float64 solve: the share of equal codes, and the asymmetric objective of all
    of them."""
    default, default_form = solvers.ASYM_MATMUL, solvers.ASYM_FORM
    solvers.ASYM_FORM = form
    try:
        ref = gptaq_quantize(W.double(), H.double(), dXXT.double(), exact=exact, backend="torch", **kw)
        out = dict(asym_loss_fp64=proxy_loss(W, ref.weight, H, dXXT)["asym_loss"])
        for mode in solvers.ASYM_MATMULS:
            solvers.ASYM_MATMUL = mode
            r = gptaq_quantize(W, H, dXXT, exact=exact, **kw)
            out[f"agree_{mode}_vs_fp64"] = float((r.codes == ref.codes).float().mean())
            out[f"asym_loss_{mode}"] = proxy_loss(W, r.weight, H, dXXT)["asym_loss"]
    finally:
        solvers.ASYM_MATMUL, solvers.ASYM_FORM = default, default_form
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, help="ROWSxCOLS (default 2048x4096 on CUDA, 16x64 on CPU)")
    p.add_argument("--quick", action="store_true", help="five representative settings only")
    p.add_argument("--min_agree", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, cols = (int(v) for v in (args.shape or ("2048x4096" if device.type == "cuda" else "16x64")).split("x"))
    group = 128 if cols >= 512 else 32
    W, H, dXXT = make_inputs(rows, cols, device, seed=args.seed)
    cases = [(label, kw, m) for label, kw in settings(group) for m in ("gptq", "gptaq", "gptaq_exact")]
    if args.quick:
        keep = {(k.format(group=group, g2=group // 4), m) for k, m in QUICK.items()}
        cases = [c for c in cases if (c[0], c[2]) in keep]
    out, worst = [], 1.0
    print(f"| setting ({rows}x{cols}) | method | same codes | rel. weight diff |")
    print("|---|---|---|---|")
    for label, kw, method in cases:
        row = dict(setting=label, **compare(W, H, dXXT, method, kw))
        worst = min(worst, row["agree"])
        out.append(row)
        print(f"| {label} | {method} | {100 * row['agree']:.3f}% | {row['rel_weight_diff']:.1e} |", flush=True)
    precision = []
    if device.type == "cuda":  # TF32 exists only on CUDA: measure what each precision changes against float64
        modes = solvers.ASYM_MATMULS
        print("| GPTAQ | same codes as float64: " + " | ".join(modes) + " | asym. objective: float64 | "
              + " | ".join(modes) + " |")
        print("|---|" + "---|" * (2 * len(modes) + 1))
        for label, kw in settings(group)[:7:3]:
            for exact, form in ((False, "m"), (False, "p"), (True, "m")):
                row = dict(setting=label, exact=exact, form=form, **precision_check(W, H, dXXT, kw, exact, form))
                precision.append(row)
                tag = " exact" if exact else (" P form" if form == "p" else "")
                print(f"| {label}{tag} | "
                      + " | ".join(f"{100 * row[f'agree_{m}_vs_fp64']:.3f}%" for m in modes)
                      + f" | {row['asym_loss_fp64']:.6g} | "
                      + " | ".join(f"{row[f'asym_loss_{m}']:.6g}" for m in modes) + " |", flush=True)
    ok = worst >= args.min_agree
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: worst agreement {100 * worst:.3f}% (need {100 * args.min_agree:.1f}%): {'OK' if ok else 'FAIL'}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, shape=[rows, cols], seed=args.seed,
                           worst=worst, ok=ok, results=out, asym_precision=precision), f, indent=2)
        os.replace(tmp, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
