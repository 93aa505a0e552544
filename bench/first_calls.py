"""What the first layer of bench/e2e_llm.py pays once per process: library loads and Triton compilation.

Each step runs twice in a row on bench/e2e_llm.py's shapes (Llama-2-7B, float16 activations, the W4A4 rotated
solver settings), CUDA synchronized; the first call's excess over the second is what a process pays once:
CUDA context, cuBLAS / cuBLASLt handles and workspaces, cuSOLVER (Cholesky), the Triton kernels' compilation (or
their load from Triton's on-disk cache, ~/.triton/cache or TRITON_CACHE_DIR) and each solver path's first use.
Run it in a fresh process; point TRITON_CACHE_DIR at an empty folder for a cold cache:

    TRITON_CACHE_DIR=$(mktemp -d) python bench/first_calls.py --json $OUT/first_calls_cold.json
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.e2e_llm import W4A4_ROTATED  # noqa: E402
from common.cli.llm import parse_args, settings  # noqa: E402
from common.io.results import environment, markdown_table, write_json  # noqa: E402

DEV = torch.device("cuda")


def _twice(fn) -> dict:
    """Wall seconds of fn's first and second call (synchronized)."""
    out = {}
    for key in ("first_s", "second_s"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out[key] = round(time.perf_counter() - t0, 4)
    out["once_s"] = round(out["first_s"] - out["second_s"], 4)
    return out


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * n, n, device=DEV, generator=g)
    return x.t() @ x / (2 * n) + 0.1 * torch.eye(n, device=DEV)


def steps() -> list[tuple[str, object]]:
    """(name, fn) in the order a layer first needs them."""
    from common import solver
    from common.quant import act_triton
    from common.quant.weight_grid import fit_grid

    g = torch.Generator(device=DEV).manual_seed(0)
    wcfg, act, _ = settings(parse_args(["--model", "unused", *W4A4_ROTATED]))
    a16 = torch.randn(2048, 4096, device=DEV, generator=g).half()
    b16 = torch.randn(4096, 4096, device=DEV, generator=g).half()
    x11 = torch.randn(2048, 11008, device=DEV, generator=g).half()
    H4, H11 = _spd(4096, g), _spd(11008, g)
    W = {(o, i): 0.02 * torch.randn(o, i, device=DEV, generator=g) for o, i in ((4096, 4096), (11008, 4096),
                                                                                (4096, 11008))}
    D = {n: 0.01 * torch.randn(n, n, device=DEV, generator=g) for n in (4096, 11008)}
    H = {4096: H4, 11008: H11}
    out: list[tuple[str, object]] = [
        ("fp16 matmul 2048x4096x4096 (cuBLAS)", lambda: a16 @ b16),
        ("float32 matmul 4096^3", lambda: H4 @ H4),
        ("cholesky + cholesky_inverse 4096 (cuSOLVER)",
         lambda: torch.cholesky_inverse(torch.linalg.cholesky(H4))),
        ("cholesky + cholesky_inverse 11008", lambda: torch.cholesky_inverse(torch.linalg.cholesky(H11))),
        ("activation quantizer [2048, 4096] (Triton)",
         lambda: act_triton.fake_quantize_rows(a16, 4096, act.bits, act.sym, act.clip_ratio)),
        ("activation quantizer [2048, 11008] (Triton)",
         lambda: act_triton.fake_quantize_rows(x11, 11008, act.bits, act.sym, act.clip_ratio)),
        ("MSE grid search [4096, 4096] (Triton)",
         lambda: fit_grid(W[(4096, 4096)], wcfg.bits, wcfg.sym, wcfg.mse, sym_grid=wcfg.sym_grid, fused=True)),
    ]
    for method in ("gptq", "gptaq"):
        cfg = dataclasses.replace(wcfg, method=method)
        for (o, i), Wm in W.items():
            out.append((f"{method} quantize_linear [{o}, {i}]",
                        lambda Wm=Wm, i=i, cfg=cfg: solver.quantize_linear(Wm, H[i], D[i], cfg)))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.zeros(1, device=DEV)
    rows = [{"step": "CUDA context (torch.zeros(1))", "first_s": round(time.perf_counter() - t0, 4)}]
    for name, fn in steps():
        rows.append({"step": name, **_twice(fn)})
    total = round(sum(r.get("once_s", r["first_s"]) for r in rows), 3)
    print(markdown_table(rows, ["step", "first_s", "second_s", "once_s"]))
    print(f"paid once in all: {total} s (TRITON_CACHE_DIR={os.environ.get('TRITON_CACHE_DIR', '(default)')})")
    result = {"rows": rows, "once_total_s": total, "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR"),
              "environment": environment()}
    if a.json:
        write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
