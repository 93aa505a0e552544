"""Per-batch passes of the block driver replayed from CUDA graphs.

A pass p(x) -> {key: tensor} (a stage's forward, the linear inputs it records, over one calibration batch) is run
eagerly on the first batch, captured once as a CUDA graph and replayed on the batches after it: the host's share of
a batch (Python, module calls, hooks, kernel launches) is paid once per group instead of once per batch.  Exact: the
capture is replayed on the first batch and compared bit for bit with its eager run; on any difference, or where the
pass synchronises with the host (routed experts' token counts, say: seen by torch.cuda's sync debug mode during the
eager run, as a capture would fail), the pass stays eager.
A replay's outputs are the graph's own buffers, overwritten by the next replay: whoever keeps one past the current
batch copies it (`BatchPass.keep`).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Callable, Iterator

import torch

from common.quant import act_quant

__all__ = ["BatchPass", "host_syncs"]

log = logging.getLogger(__name__)
Outputs = dict[str, torch.Tensor]


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device, warm_up: Callable[[], object]) -> torch.cuda.Stream:
    """The one side stream all captures on `device` use.  On its first use warm_up() runs on it outside a capture,
    so that the libraries' per-stream state (cuBLAS workspaces) is made once, in ordinary memory, and not inside a
    graph's pool; one stream, so only one such state (a new stream per capture would leave a workspace each)."""
    if device not in _STREAMS:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            warm_up()
        torch.cuda.synchronize(device)
        _STREAMS[device] = stream
    return _STREAMS[device]


@contextlib.contextmanager
def host_syncs() -> Iterator[list[str]]:
    """The implicit host-device synchronisations this thread makes inside the block ('file:line' of each, in
    order), from torch.cuda's sync debug mode."""
    found: list[str] = []
    me = threading.get_ident()

    def record(message, category, filename, lineno, file=None, line=None):
        if threading.get_ident() == me and "called a synchronizing" in str(message):
            found.append(f"{filename}:{lineno}")

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class BatchPass:
    """p(x) for every calibration batch x of one group: eager on the first batch, then a CUDA graph replayed
    (`graphs=True` on a CUDA device); eager throughout otherwise.

    Passes created with the same `pool` (`torch.cuda.graph_pool_handle()`) share their graphs' memory and must then
    be called in the same order on every batch (their capture order), as the driver's capture loop does.
    """

    def __init__(self, fn: Callable[[torch.Tensor], Outputs], device: torch.device, graphs: bool, pool=None,
                 label: str = "pass"):
        self.fn, self.label, self.pool = fn, label, pool
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x: torch.Tensor | None = None
        self._outputs: Outputs | None = None
        self._first = graphs and torch.device(device).type == "cuda"

    @property
    def replaying(self) -> bool:
        """Whether the outputs come from the graph's buffers (to be copied by whoever keeps them)."""
        return self._graph is not None

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """t, or a copy of it when it is a buffer of the graph."""
        return t.clone() if self._graph is not None else t

    def __call__(self, x: torch.Tensor) -> Outputs:
        if self._graph is not None and x.shape == self._static_x.shape and x.dtype == self._static_x.dtype:
            self._static_x.copy_(x, non_blocking=True)
            self._graph.replay()
            return self._outputs
        if not self._first:
            return self.fn(x)
        self._first = False  # this eager run warms up every kernel (compiles, autotuning, cuBLAS handles)
        with host_syncs() as syncs:
            out = self.fn(x)
        if syncs:  # a capture would fail, and a failed capture leaves torch's CUDA state unusable
            log.info("%s: synchronises with the host (%s); running it eagerly", self.label, syncs[0])
        else:
            self._capture(x, out)
        return out

    def close(self) -> None:
        """Free the graph and its buffers, and whatever fn holds (its `close()`, e.g. hooks)."""
        self._graph = self._static_x = self._outputs = None
        close = getattr(self.fn, "close", None)
        if close is not None:
            close()

    def _capture(self, x: torch.Tensor, want: Outputs) -> None:
        """Capture fn on a copy of x, replay it on x and keep the graph if it reproduces want bit for bit."""
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in want.values()):
            return
        static_x = x.detach().clone()
        graph = torch.cuda.CUDAGraph()
        side = _capture_stream(x.device, lambda: self.fn(static_x))
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    outputs = self.fn(static_x)
                finally:
                    graph.capture_end()
        except RuntimeError as e:  # e.g. a host synchronisation inside the pass: it stays eager
            torch.cuda.current_stream().wait_stream(side)
            log.warning("%s: not captured as a CUDA graph (%s); running it eagerly (a failed capture can leave "
                        "torch's CUDA state unusable: run without --cuda_graphs)", self.label,
                        str(e).split("\n")[0])
            return
        finally:
            act_quant.forget_shared()  # the memo must not hold the capture's buffers
        torch.cuda.current_stream().wait_stream(side)
        graph.replay()
        if outputs.keys() != want.keys() or not all(
                o.shape == w.shape and torch.equal(o, w) for o, w in ((outputs[k], want[k]) for k in want)):
            log.info("%s: the CUDA graph's replay differs from the eager run; running it eagerly", self.label)
            return
        self._graph, self._static_x, self._outputs = graph, static_x, outputs
