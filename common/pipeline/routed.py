"""Calibration statistics of routed experts (MoE blocks, `common.models.moe.RoutedExperts`), and their fallback.

Expert e is fitted on the tokens routed to it, T_e = {t : e in topk(router(h~_t))}:
    H_e = (2/|T_e|) sum_{t in T_e} x~_t x~_t^T,    dXXT_e = (2/|T_e|) sum_{t in T_e} (x_t - x~_t) x~_t^T   (GPTAQ),
x~_t the input expert e's linear receives in the quantized model and x_t the input the full-precision expert computes
from the full-precision stream's hidden state of the same token t.  The routing T_e is the quantized stream's
(the router reading h~), for GPTQ and for GPTAQ: it is the set of tokens expert e will receive once the model is
quantized, so it is the distribution H must describe, and every routed token then has both inputs (the FP stream's
own routing would fit experts on tokens the quantized router sends elsewhere, and leave tokens without a partner).
The full-precision stream still advances with its own routing (its block output is the full-precision model's).
Tokens count once, unweighted by their routing probability, as a hook on each expert linear would see them.

An expert routed fewer than `RoutedExperts.min_tokens` calibration tokens (over all batches and ranks) is not
solved from its few tokens: `fallback_config` gives the driver RTN on the same grid (bits, groups, symmetry, MSE
clip), logged with its token count and recorded as "fallback": "rtn".
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from common.models.moe import RoutedExperts
from common.pipeline import distributed
from common.pipeline.hessian import HessianAccumulator
from common.solver import SolverConfig

__all__ = ["FALLBACK", "is_expert_group", "capture_group", "fallback_config"]

log = logging.getLogger(__name__)
FALLBACK = "rtn"


class _Stop(Exception):
    """Raised by the recorder once the experts' inputs are recorded and nothing after them is needed."""


def _split(name: str) -> tuple[str, int, str] | None:
    """'mlp.experts.3.down_proj' -> ('mlp.experts', 3, 'down_proj'); None for any other name."""
    head, _, rest = name.rpartition(".")
    owner, _, e = head.rpartition(".")
    return (owner, int(e), rest) if e.isdigit() and owner else None


def is_expert_group(block: nn.Module, names: list[str]) -> bool:
    """The group is expert linears of one RoutedExperts (all gate/up, or all down_proj)."""
    parts = [_split(n) for n in names]
    if not parts or any(p is None for p in parts):
        return False
    owners = {p[0] for p in parts}
    return len(owners) == 1 and isinstance(block.get_submodule(owners.pop()), RoutedExperts)


class _Recorder:
    """Set as RoutedExperts.recorder: keeps, per expert, the inputs of its `kind` of linear ("input": gate/up,
    "down": down_proj) on the tokens that `routing` (default: the block's own) sends to it."""

    def __init__(self, kind: str, experts: list[int], routing: torch.Tensor | None = None, stop: bool = True):
        self.kind, self.experts, self.routing, self.stop = kind, experts, routing, stop
        self.inputs: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def record(self, module: RoutedExperts, x: torch.Tensor, top_k_index: torch.Tensor) -> None:
        if self.routing is None:
            self.routing = top_k_index
        for e in self.experts:
            token = torch.where(self.routing == e)[0]
            rows = x[token]
            self.inputs[e] = rows if self.kind == "input" else module.down_input(e, rows)
        if self.stop:
            raise _Stop


def _run(run_block, block: nn.Module, experts: RoutedExperts, x: torch.Tensor, recorder: _Recorder):
    experts.recorder = recorder
    try:
        return run_block(block, x)
    except _Stop:
        return None
    finally:
        experts.recorder = None


@torch.no_grad()
def capture_group(block, fp_block, names, xq, xfp, run_block, device, asymmetric, advance_fp=None
                  ) -> dict[str, HessianAccumulator]:
    """H_e (and dXXT_e) of every expert linear in `names` (one RoutedExperts' gate/up or down linears), over all
    batches; the driver's `_capture_group` contract: linears of one expert that read the same input (gate, up)
    share one accumulator; advance_fp(b, out) receives the full-precision block's output when given.
    Each accumulator carries `fallback` (None or "rtn", see `fallback_config`)."""
    parts = [_split(n) for n in names]
    owner = parts[0][0]
    kind = "down" if parts[0][2] == "down_proj" else "input"
    experts = block.get_submodule(owner)
    fp_experts = fp_block.get_submodule(owner) if asymmetric else None
    ids = sorted({p[1] for p in parts})
    cols = experts.intermediate_dim if kind == "down" else experts.hidden_dim
    stats = {e: HessianAccumulator(cols, device, asymmetric) for e in ids}
    for b in range(len(xq)):
        q = _Recorder(kind, ids)
        _run(run_block, block, experts, xq[b].to(device, non_blocking=True), q)
        if q.routing is None:
            raise RuntimeError(f"{owner} was not called by the block's forward; check sublayer_groups")
        fp = None
        if asymmetric:  # the same tokens (the quantized stream's routing) through the full-precision expert
            fp = _Recorder(kind, ids, routing=q.routing, stop=advance_fp is None)
            out = _run(run_block, fp_block, fp_experts, xfp[b].to(device, non_blocking=True), fp)
            if advance_fp is not None:
                advance_fp(b, out)
        for e in ids:
            if q.inputs[e].shape[0]:
                stats[e].add(q.inputs[e], fp.inputs[e] if fp is not None else None)
    for e in ids:
        stats[e].all_reduce()
        stats[e].fallback = FALLBACK if stats[e].nsamples < experts.min_tokens else None
        if stats[e].fallback and distributed.is_main():
            log.warning("%s.%d (%s): %d routed calibration tokens < --moe_min_tokens %d: %s fallback", owner, e,
                        "down_proj" if kind == "down" else "gate_proj, up_proj", stats[e].nsamples,
                        experts.min_tokens, FALLBACK.upper())
    return {n: stats[p[1]] for n, p in zip(names, parts)}


def fallback_config(cfg: SolverConfig, acc) -> tuple[SolverConfig, str | None]:
    """The configuration a linear is solved with: `cfg`, or RTN on the same grid (and the fallback's name) when a
    calibrating method has no statistics for it or they are marked as too few (an expert with few routed tokens)."""
    if cfg.needs_data and (acc is None or getattr(acc, "fallback", None)):
        return cfg.replace(method="rtn"), FALLBACK
    return cfg, None
