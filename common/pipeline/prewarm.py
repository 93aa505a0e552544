"""Compile a run's Triton kernels in background threads while the model loads, instead of in its first layer.

Triton compiles a kernel on its first call in a process (on a cold on-disk cache, ~/.triton/cache or
TRITON_CACHE_DIR, about 1 to 2 s per kernel: bench/first_calls.py), and the first layer's capture and solve would
wait for each compile in turn with the GPU idle.  `start` calls each kernel once on a tiny problem of the same
specialization (dtype and block-size constants; sizes that are multiples of 16, as real models' are), one thread
per kernel family, so the compiles run side by side with each other and with the model's loading; `Prewarm.wait`
joins them before the first layer.  Nothing else changes: results are those of the real calls, and a kernel whose
specialization the tiny problem missed is compiled at its first real call, as without a prewarm.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

import torch

from common.solver import SolverConfig

__all__ = ["Prewarm", "start"]

log = logging.getLogger(__name__)


class Prewarm:
    """The running warm-up calls (none where there is nothing to compile)."""

    def __init__(self, futures: list[Future], pool: ThreadPoolExecutor | None) -> None:
        self._futures, self._pool = futures, pool

    def wait(self) -> float:
        """Join the warm-up calls; returns the seconds waited.  A failed warm-up is logged, not raised: the real
        call then compiles (or reports the problem) as it would have without the prewarm."""
        t0 = time.perf_counter()
        for f in self._futures:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - the real call reports real problems
                log.debug("kernel prewarm failed (the first real call compiles instead): %s", e)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            # the threads' cuBLAS handles each kept a workspace (32 MiB on Hopper) that would count in the peak
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None and torch.cuda.is_initialized():
                clear()
        self._futures, self._pool = [], None
        return time.perf_counter() - t0


def _act_calls(widths: Iterable[tuple[int, bool]], dtype: torch.dtype, device: torch.device) -> list[Callable]:
    from common.quant import act_triton

    calls = []
    for columns, sym in sorted(set(widths)):
        def call(columns=columns, sym=sym):
            x = torch.randn(16, columns, device=device).to(dtype)
            if act_triton.available(x, columns):
                act_triton.fake_quantize_rows(x, columns, 4, sym, 1.0)
        calls.append(call)
    return calls


def _solver_call(cfg: SolverConfig, device: torch.device) -> Callable:
    from common import solver

    def call():
        g = torch.Generator(device=device).manual_seed(0)
        cols = 2 * cfg.blocksize if cfg.group_size <= 0 else 2 * max(cfg.blocksize, cfg.group_size)
        X = torch.randn(4 * cols, cols, device=device, generator=g)
        H = X.t() @ X / X.shape[0] + 0.1 * torch.eye(cols, device=device)
        D = 0.01 * torch.randn(cols, cols, device=device, generator=g)
        W = torch.randn(32, cols, device=device, generator=g)
        solver.quantize_linear(W, H, D, cfg, name="prewarm")

    return call


def start(device: torch.device | str, dtype: torch.dtype, cfg: SolverConfig,
          act_widths: Iterable[tuple[int, bool]] = ()) -> Prewarm:
    """Warm up, on CUDA `device`, what the layer-by-layer solve of `cfg` calls: the solver's kernels (its MSE grid
    search and column walk, where cfg solves with them) and, when cfg calibrates with the activation quantizers on
    (cfg.acts_during_capture: GPTAQ), the activation quantizer's for each (row width, symmetric) in `act_widths` on
    `dtype` activations.  Returns at once; nothing to do (CPU, no data-driven solve) gives an empty Prewarm."""
    device = torch.device(device)
    calls: list[list[Callable]] = []
    if device.type == "cuda" and cfg.needs_data:
        acts = _act_calls(act_widths, dtype, device) if cfg.acts_during_capture else []
        if acts:
            calls.append(acts)
        if cfg.backend in ("auto", "triton"):
            calls.append([_solver_call(cfg, device)])
    if not calls:
        return Prewarm([], None)

    def run(family: list[Callable]) -> None:
        with torch.cuda.device(device), torch.no_grad():
            for call in family:
                call()
            torch.cuda.synchronize(device)

    pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="prewarm")
    return Prewarm([pool.submit(run, family) for family in calls], pool)
