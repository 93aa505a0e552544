"""Block-by-block post-training quantization driver (GPTQ, GPTAQ, RTN), shared by the LLM and ViT front ends.

Block l is quantized on the stream X~_l of the already-quantized blocks 0..l-1.  For each group of its linears
(solved in order, earlier groups already quantized) the driver accumulates H = (2/N) X~ X~^T and, for GPTAQ,
dXXT = (2/N)(X - X~) X~^T with X the input of the same linear in the full-precision block run on the
full-precision stream X_l; then W <- solver(W, H[, dXXT]).  Both streams advance one block at a time.
GPTQ / RTN capture with activation quantizers off (weights first); GPTAQ captures X~ with them on
(`quant_order` overrides either: "w_first" / "a_first", the paper's Table 6).
With `stages` (a `common.models.stages.BlockStages` per block, e.g. a decoder layer's two residual halves) each
group is captured from its stage's input and the streams advance stage by stage (checked bit for bit against the
whole block on the first batch).
On the CPU, GPTAQ records the FP stage's linear inputs for all its groups in one FP pass per stage (host memory:
one stage's linear inputs over the calibration set) instead of a partial FP pass per group.
Under torchrun (`common.pipeline.distributed`) each rank carries its shard of both streams, the statistics are summed over
ranks, and a group's linears are solved round robin by the ranks and broadcast; `common.pipeline.resume` checkpoints after
every block.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from common.pipeline import distributed, routed
from common.pipeline.graphs import BatchPass
from common import solver
from common.solver import SolverConfig
from common.models.stages import BlockStages
from common.quant.act_quant import ActQuantLinear, set_act_quant
from common.pipeline.hessian import HessianAccumulator
from common.pipeline.resume import ResumeError, ResumeState

__all__ = ["quantize_blocks", "BlockStages"]

log = logging.getLogger(__name__)

class _StopForward(Exception):
    """Raised from a hook once every linear of the group has shown its input: the rest of the block is skipped."""


def _weight_module(module: nn.Module) -> nn.Module:
    """The module whose input is exactly what the weight sees (the inner linear of an ActQuantLinear)."""
    return module.linear if isinstance(module, ActQuantLinear) else module


def _block_device(block: nn.Module) -> torch.device:
    for t in list(block.parameters()) + list(block.buffers()):
        return t.device
    return torch.device("cpu")


class _GroupRecorder:
    """Forward pre-hooks on a group's linears: pass each input to `sink(name, x)`; once every linear of the group
    has been called (each linear is assumed to run once per block forward), stop the block's forward, or with
    stop=False let it run to its end and return its output."""

    def __init__(self, block: nn.Module, names: list[str], sink: Callable[[str, torch.Tensor], None],
                 stop: bool = True):
        self.names, self.sink, self.stop, self.seen = names, sink, stop, set()
        self.handles = [_weight_module(block.get_submodule(n)).register_forward_pre_hook(self._hook(n))
                        for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            self.sink(name, args[0])
            self.seen.add(name)
            if self.stop and len(self.seen) == len(self.names):
                raise _StopForward
        return hook

    def run(self, run_block: Callable, block: nn.Module, x: torch.Tensor):
        self.seen = set()
        out = None
        try:
            out = run_block(block, x)
        except _StopForward:
            pass
        missing = set(self.names) - self.seen
        if missing:
            raise RuntimeError(f"linears {sorted(missing)} were not called by the block's forward; "
                               "check sublayer_groups")
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _to(x: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if device.type == "cpu":
        x = x.to("cpu")
        return x.pin_memory() if pin and not x.is_pinned() else x
    return x.to(device, non_blocking=True)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))


@torch.no_grad()
def _record_fp_inputs(fp_block, names, xfp, run_block, device, stream_device, pin) -> list[dict[str, torch.Tensor]]:
    """GPTAQ on the CPU: one forward of the full-precision block per batch records the input of every linear in
    `names` (the FP block never changes, so these are exactly the inputs each group's capture would otherwise
    recompute in a partial FP pass) and advances the FP stream; returns {name: x} per batch."""
    inputs: list[dict[str, torch.Tensor]] = []
    rec = _GroupRecorder(fp_block, names, lambda name, x: inputs[-1].__setitem__(name, x), stop=False)
    try:
        for b in range(len(xfp)):
            inputs.append({})
            xfp[b] = _to(_output(rec.run(run_block, fp_block, xfp[b].to(device))), stream_device, pin)
    finally:
        rec.remove()
    return inputs


@torch.no_grad()
def _capture_group(block, fp_block, names, xq, xfp, run_block, device, asymmetric, advance_fp=None, fp_inputs=None,
                   entry=None, graphs=False):
    """H (and dXXT) of every linear in `names`, over all batches.

    Linears that see equal inputs (q/k/v and up/gate: the same hidden states through identical activation
    quantizers) share one accumulator, so each distinct input is accumulated once: the first batch compares every
    linear's inputs with the group's earlier ones, each later batch checks that they still agree, and a linear whose
    inputs stop agreeing takes a copy of the sums so far and continues on its own.
    advance_fp(b, out): the full-precision block runs to its end and hands over its output for batch b (the FP
    stream's advance, which then needs no second pass of the unchanged FP block).
    fp_inputs: the FP inputs `_record_fp_inputs` recorded (used, and dropped, instead of running the FP block).
    entry(blk, x): what the group's linears are called with (`BlockStages.entry`, checked by `_plan`): their inputs
    are then formed from it directly instead of running the block up to them (the FP block too, unless it must run
    to its end for advance_fp).
    graphs: each batch's passes (FP, quantized) replayed from CUDA graphs after the first batch (`BatchPass`).
    """
    stats: dict[str, HessianAccumulator] = {}
    leader: dict[str, str] = {}  # name -> the linear whose accumulator it shares (itself when its own)
    seen: dict[str, tuple] = {}  # this batch: name -> (x~, x)

    def agrees(other, x, fp):
        return _same(seen[other][0], x) and _same(seen[other][1], fp)

    def accumulate():
        for name in names:
            x, fp = seen[name]
            if name not in leader:  # first batch
                leader[name] = next((o for o in names if leader.get(o) == o and agrees(o, x, fp)), name)
                stats[name] = (HessianAccumulator(x.shape[-1], device, asymmetric) if leader[name] == name
                               else stats[leader[name]])
            elif leader[name] != name and not agrees(leader[name], x, fp):
                stats[name] = stats[leader[name]].clone()  # the earlier batches agreed: their sums are shared
                leader[name] = name
        for name in names:
            if leader[name] == name:
                stats[name].add(*seen[name])
        seen.clear()

    fp_entry = entry is not None and advance_fp is None
    pool = torch.cuda.graph_pool_handle() if graphs and device.type == "cuda" else None
    q_pass = BatchPass(_linear_inputs_pass(block, names, run_block, entry, stop=True), device, graphs, pool,
                       f"capture {names[0]}")
    fp_pass = None
    if asymmetric and fp_inputs is None:  # called before q_pass on every batch (the graphs' capture order)
        fp_pass = BatchPass(_linear_inputs_pass(fp_block, names, run_block, entry if fp_entry else None,
                                                stop=advance_fp is None),
                            device, graphs, pool, f"capture {names[0]} (full precision)")
    try:
        for b in range(len(xq)):
            fp = None
            if fp_inputs is not None:
                fp = {name: fp_inputs[b].pop(name) for name in names}
            elif fp_pass is not None:
                fp = fp_pass(xfp[b].to(device, non_blocking=True))
                if advance_fp is not None:
                    advance_fp(b, fp_pass.keep(fp[_OUTPUT]))
            q = q_pass(xq[b].to(device, non_blocking=True))
            seen.update((name, (q[name], fp[name] if asymmetric else None)) for name in names)
            accumulate()
    finally:
        for p in (q_pass, fp_pass):
            if p is not None:
                p.close()
    if distributed.world_size() > 1:  # every linear its own sums, so that all ranks make the same all-reduces
        for name in names:
            if leader[name] != name:
                stats[name] = stats[name].clone()
        for name in names:
            stats[name].all_reduce()
    return stats


_OUTPUT = "<output>"  # the key of a pass's block output among the linear inputs it returns


def _linear_inputs_pass(block, names, run_block, entry, stop: bool) -> Callable[[torch.Tensor], dict]:
    """x -> {name: the input linear `name` of `block` sees}: formed from entry(block, x) when given, else recorded
    by hooks while run_block(block, x) runs (stopped once all are seen when `stop`, otherwise run to its end and its
    output returned under _OUTPUT).  The hooks are registered until the pass's `close` (BatchPass)."""
    if entry is not None:
        def from_entry(x):
            h = entry(block, x)
            return {name: _linear_input(block, name, h) for name in names}
        return from_entry
    got: dict[str, torch.Tensor] = {}
    rec = _GroupRecorder(block, names, got.__setitem__, stop=stop)

    def recorded(x):
        got.clear()
        out = rec.run(run_block, block, x)
        res = dict(got)
        if not stop:
            res[_OUTPUT] = _output(out)
        return res
    recorded.close = rec.remove
    return recorded


def _capture(block, fp_block, group, xq, xfp, run_stage, device, asymmetric, needs_data, advance_fp, fp_inputs,
             entry, graphs) -> dict[str, HessianAccumulator]:
    """The group's statistics: none without calibration data (RTN), routed experts' per expert, else
    `_capture_group`."""
    if not needs_data:
        return {}
    if routed.is_expert_group(block, group):
        return routed.capture_group(block, fp_block, group, xq, xfp, run_stage, device, asymmetric, advance_fp)
    return _capture_group(block, fp_block, group, xq, xfp, run_stage, device, asymmetric, advance_fp, fp_inputs,
                          entry, graphs)


def quantize_blocks(
    blocks: Sequence[nn.Module],
    inputs: list[torch.Tensor],
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    sublayer_groups: Callable[[nn.Module], list[list[str]]],
    cfg: SolverConfig,
    prepare_block: Callable[[nn.Module], None] | None = None,
    device: torch.device | str = "cpu",
    offload_inputs: bool = False,
    desc: str = "blocks",
    on_quantized: Callable[[int, str, solver.QuantResult], None] | None = None,
    resume: ResumeState | None = None,
    block_times: list[dict] | None = None,
    stages: Callable[[nn.Module], BlockStages | None] | None = None,
    cuda_graphs: bool = False,
) -> list[dict]:
    """Quantize `blocks` in place, one at a time on `device` (each goes back to its original device afterwards).

    inputs: the calibration inputs of blocks[0], one tensor per batch (may be empty for RTN / method "none").
    run_block(block, x): one block's forward (closing over masks, position embeddings...); a tuple output's first
    element is taken as the hidden states.  sublayer_groups(block): the names of its linears, grouped, in solve
    order.  prepare_block(block): wraps the linears in ActQuantLinear / sets activation quantizers (before capture).
    offload_inputs: keep both streams on CPU (pinned with CUDA) between blocks instead of on `device`.
    on_quantized(block_index, name, QuantResult): optional callback per solved linear (e.g. for export).
    resume: checkpoint after every block into this `common.pipeline.resume.ResumeState`, and first skip the blocks it has
    finished (their saved weights are loaded, on_quantized is replayed from the saved results) and restart from its
    saved streams.
    Under torchrun, `inputs` is this rank's shard of the calibration batches (`common.pipeline.distributed.shard`); every
    rank ends with the same weights.
    block_times: if given, one {"block", "capture_s", "solve_s", "forward_s", "copy_s", "release_s", "groups"} is
    appended per quantized block: wall seconds spent capturing H / dXXT, solving (incl. proxy losses), advancing the
    streams, before the first capture (to the device, quantizers, GPTAQ's FP copy) and after the last forward
    (checkpoint, back home, CUDA cache emptied), and per group {"group" (its first linear), "capture_s", "solve_s"
    [, "gpu_peak_capture_gib", "gpu_peak_solve_gib" (the running peak after each)]}; CUDA synchronized.  The same
    phases are torch.profiler ranges "capture:<first linear>", "solve:<first linear>", "forward:stage<s>".
    On CUDA also "gpu_alloc_start_gib" (allocated when the block
    began) and "gpu_peak_gib" (torch.cuda.max_memory_allocated after it: the running peak since the caller's reset).
    stages(block): optional `BlockStages` of the block (None: none): each group is then captured from its stage's
    input and the streams advance stage by stage (less forward work, same results; see BlockStages).
    cuda_graphs (default off): on CUDA, each group's per-batch passes (and each stage's forward) are captured as
    CUDA graphs on the first batch and replayed on the others (`common.pipeline.graphs.BatchPass`: checked bit for
    bit on the first batch, eager where a pass synchronises with the host); False: every batch eager.
    Returns one record per linear: {"block", "name", "method", "bits", "shape", "tokens", "loss"[, "asym_loss"],
    "seconds"}; proxy losses are from `common.solver.proxy_loss` (none for RTN, which runs no calibration).
    """
    device = torch.device(device)
    stream_device = torch.device("cpu") if offload_inputs else device
    pin = offload_inputs and device.type == "cuda"
    asymmetric = cfg.asymmetric
    needs_data = cfg.needs_data
    if needs_data and not inputs:
        raise ValueError(f"{cfg.method} needs calibration inputs, got none")
    xq = [_to(x, stream_device, pin) for x in inputs] if needs_data else []
    xfp = [x for x in xq] if asymmetric else []  # same tensors until the first block replaces them
    records: list[dict] = []
    start = 0
    if resume is not None and cfg.active:
        start, records = resume.load()
        if needs_data and 0 < start < len(blocks):
            xq, xfp = resume.load_streams(start, inputs, asymmetric)
            xq, xfp = [_to(x, stream_device, pin) for x in xq], [_to(x, stream_device, pin) for x in xfp]

    for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not distributed.is_main())):
        if i < start:
            _restore_block(resume, i, block, prepare_block, cfg.acts_during_capture, on_quantized)
            continue
        t_block = _now(device)
        alloc_start = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        home = _block_device(block)
        block.to(device)
        if prepare_block is not None:
            prepare_block(block)
        if not cfg.active:
            block.to(home)
            continue
        distributed.broadcast_module_(block)  # ranks start every block from identical weights
        set_act_quant(block, cfg.acts_during_capture)
        fp_block = None
        if asymmetric:
            fp_block = copy.deepcopy(block)
            set_act_quant(fp_block, False)
        block_records, block_results = [], {}
        times = dict.fromkeys(("capture_s", "solve_s", "forward_s"), 0.0)
        group_times: list[dict] = []
        times["copy_s"] = _now(device) - t_block  # to the device, quantizers, GPTAQ's full-precision copy
        groups = sublayer_groups(block)
        t0 = _now(device)
        plan = _plan(block, groups, stages, run_block, xq[0] if xq else None, device)
        times["capture_s"] += _now(device) - t0
        for si, stage_groups in enumerate(plan.groups):
            def run_stage(blk, x, si=si):
                return plan.run(blk, si, x)

            fp_inputs = None
            if asymmetric and needs_data and device.type == "cpu" and \
                    not any(routed.is_expert_group(block, g) for g in stage_groups):
                t0 = _now(device)  # CPU: one FP pass of the stage records every group's FP inputs
                fp_inputs = _record_fp_inputs(fp_block, [n for g in stage_groups for n in g], xfp, run_stage, device,
                                              stream_device, pin)
                times["capture_s"] += _now(device) - t0
            for gi, group in enumerate(stage_groups):
                t0 = _now(device)
                # GPTAQ: the stage's last group's capture runs the FP stage to its end and advances the FP stream
                advance_fp = None
                if asymmetric and fp_inputs is None and gi == len(stage_groups) - 1:
                    def advance_fp(b, out):
                        xfp[b] = _to(_output(out), stream_device, pin)
                entry = None
                if gi == 0 and plan.entry is not None:
                    def entry(blk, x, si=si):
                        return plan.entry(blk, si, x)
                with torch.profiler.record_function(f"capture:{group[0]}"):
                    stats = _capture(block, fp_block, group, xq, xfp, run_stage, device, asymmetric, needs_data,
                                     advance_fp, fp_inputs, entry, cuda_graphs)
                t1 = _now(device)
                times["capture_s"] += t1 - t0
                peak_capture = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
                keep = on_quantized is not None
                single = distributed.world_size() == 1
                mine = {}
                with torch.profiler.record_function(f"solve:{group[0]}"):
                    for j, name in enumerate(group):
                        if distributed.owner(j) == distributed.rank():
                            mine[name] = _solve_linear(block, name, stats.get(name), cfg, i, desc, keep)
                            if keep and single:  # handed over at once: one linear's result alive at a time
                                mine[name] = _hand_over(i, name, *mine[name], on_quantized, resume, block_results)
                    del stats
                    for name, (rec, res) in _share_solved(block, group, mine).items():
                        block_records.append(rec)
                        if keep and not single:
                            _hand_over(i, name, rec, res, on_quantized, resume, block_results)
                t2 = _now(device)
                times["solve_s"] += t2 - t1
                group_times.append({"group": group[0], "capture_s": round(t1 - t0, 4), "solve_s": round(t2 - t1, 4)})
                if device.type == "cuda":  # the running peak after the group's capture and after its solve
                    group_times[-1]["gpu_peak_capture_gib"] = round(peak_capture / 2**30, 3)
                    group_times[-1]["gpu_peak_solve_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            t0 = _now(device)
            # the quantized stream through this stage (the FP stream advanced during capture)
            with torch.no_grad(), torch.profiler.record_function(f"forward:stage{si}"):
                forward = BatchPass(lambda x, run_stage=run_stage: {_OUTPUT: _output(run_stage(block, x))}, device,
                                    cuda_graphs, label=f"{desc} {i} stage {si} forward")
                def advanced(x, forward=forward):  # a graph's buffer is copied when kept on its device
                    out = forward(x)[_OUTPUT]
                    return forward.keep(out) if stream_device == device else out
                for b in range(len(xq)):
                    xq[b] = _to(advanced(xq[b].to(device, non_blocking=True)), stream_device, pin)
                forward.close()
            times["forward_s"] += _now(device) - t0
        del fp_block
        t_end = _now(device)
        records.extend(block_records)
        if resume is not None:
            resume.save_block(i, {r["name"]: _weight_module(block.get_submodule(r["name"])).weight
                                  for r in block_records}, block_results if on_quantized is not None else None)
            last = i + 1 == len(blocks)  # no block reads the last block's outputs
            resume.commit(i + 1, [] if last else xq, [] if last else xfp, records)
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if block_times is not None:
            times["release_s"] = _now(device) - t_end  # checkpoint (--resume), back home, cache emptied
            block_times.append({"block": i, **{k: round(v, 4) for k, v in times.items()}, "groups": group_times})
            if alloc_start is not None:  # what the block found allocated; the running peak since the caller's reset
                block_times[-1]["gpu_alloc_start_gib"] = round(alloc_start / 2**30, 3)
                block_times[-1]["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        if distributed.is_main():
            log.info("%s %d: %s", desc, i, "  ".join(_fmt(r) for r in block_records))
    return records


def _hand_over(i: int, name: str, rec: dict, res: solver.QuantResult, on_quantized: Callable, resume,
               block_results: dict) -> tuple[dict, None]:
    """Pass a solved linear's result to on_quantized (and keep a host copy for --resume's replay); (rec, None)."""
    on_quantized(i, name, res)
    if resume is not None:
        block_results[name] = _result_to_cpu(res)
    return rec, None


def _solve_linear(block: nn.Module, name: str, acc: HessianAccumulator | None, cfg: SolverConfig, i: int, desc: str,
                  keep_result: bool) -> tuple[dict, solver.QuantResult | None]:
    """Solve one linear of the block in place from its statistics: (record, QuantResult if keep_result)."""
    t0 = time.time()
    W = _weight_module(block.get_submodule(name)).weight.data
    lcfg, fallback = routed.fallback_config(cfg, acc)  # RTN for an expert with too few routed tokens
    solved = acc is not None and fallback is None
    res = solver.quantize_linear(W.float(), acc.H if solved else None, acc.dXXT if solved else None,
                                 lcfg, name=f"{desc}.{i}.{name}")
    rec = {"block": i, "name": name, "method": cfg.method, "bits": cfg.bits, "shape": list(W.shape)}
    if fallback is not None:
        rec["fallback"] = fallback
    if acc is not None:
        rec["tokens"] = acc.nsamples
        if acc.nsamples:
            rec.update(solver.proxy_loss(W.float(), res.weight, acc.H, acc.dXXT))
    W.copy_(res.weight.to(W.dtype))
    rec["seconds"] = round(time.time() - t0, 4)
    return rec, (res if keep_result else None)


def _plan(block: nn.Module, groups: list[list[str]], stages: Callable[[nn.Module], BlockStages | None] | None,
          run_block: Callable, x0: torch.Tensor | None, device: torch.device) -> BlockStages:
    """The block's stages, if `stages` gives some that hold `groups` in order and compute what run_block computes
    (checked on x0, bit for bit); otherwise one stage: the whole block."""
    whole = BlockStages([groups], lambda blk, s, x: _output(run_block(blk, x)))
    plan = stages(block) if stages is not None and x0 is not None else None
    if plan is None:
        return whole
    if [g for stage in plan.groups for g in stage] != groups:
        raise ValueError(f"stages hold the groups {plan.groups}, expected {groups} in that order")
    x0 = x0.to(device, non_blocking=True)
    if not _stages_agree(block, plan, run_block, x0):
        log.warning("the block's stages do not reproduce its forward bit for bit; capturing from the block input")
        return whole
    if plan.entry is not None and not _entries_agree(block, plan, x0):
        log.info("the stages' entry does not give their first linears' inputs bit for bit; running the stages")
        return dataclasses.replace(plan, entry=None)
    return plan


@torch.no_grad()
def _stages_agree(block: nn.Module, plan: BlockStages, run_block: Callable, x: torch.Tensor) -> bool:
    want = _output(run_block(block, x))
    for s in range(len(plan.groups)):
        x = plan.run(block, s, x)
    return want.shape == x.shape and bool(torch.equal(want, x))


def _linear_input(block: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
    """The input the weight of linear `name` sees when the linear is called with h (its wrapper's transform and
    activation quantizer applied)."""
    module = block.get_submodule(name)
    return module.quantized_input(h) if isinstance(module, ActQuantLinear) else h


@torch.no_grad()
def _entries_agree(block: nn.Module, plan: BlockStages, x: torch.Tensor) -> bool:
    """Whether plan.entry gives, on x, exactly the inputs that the first group of every stage is called with (the
    stages run in order; a stage that starts with routed experts is not captured through its entry)."""
    for s, stage_groups in enumerate(plan.groups):
        names = stage_groups[0]
        if not routed.is_expert_group(block, names):
            seen: dict[str, torch.Tensor] = {}
            rec = _GroupRecorder(block, names, seen.__setitem__)
            try:
                rec.run(lambda blk, y: plan.run(blk, s, y), block, x)
            finally:
                rec.remove()
            h = plan.entry(block, s, x)
            if not all(_same(seen[n], _linear_input(block, n, h)) for n in names):
                return False
        x = plan.run(block, s, x)
    return True


def _now(device: torch.device) -> float:
    """perf_counter after the device's queued work has finished (phase timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _share_solved(block: nn.Module, group: list[str], mine: dict[str, tuple]) -> dict[str, tuple]:
    """{name: (record, QuantResult or None)} of the whole group, in group order, on every rank: each solved weight
    is broadcast from the rank that solved it (`distributed.owner`), records and results are gathered."""
    if distributed.world_size() == 1:
        return mine
    for j, name in enumerate(group):
        distributed.broadcast_(_weight_module(block.get_submodule(name)).weight.data, distributed.owner(j))
    cpu = {n: (rec, None if res is None else _result_to_cpu(res)) for n, (rec, res) in mine.items()}
    solved = {}
    for part in distributed.all_gather_object(cpu):
        solved.update(part)
    return {name: solved[name] for name in group}


def _result_to_cpu(res: solver.QuantResult) -> solver.QuantResult:
    return solver.QuantResult(**{f: v.cpu() if isinstance(v, torch.Tensor) else v for f, v in vars(res).items()})


def _restore_block(resume: ResumeState, i: int, block: nn.Module, prepare_block, acts_on: bool,
                   on_quantized) -> None:
    """A block finished by an earlier run: wrap it as the run did, load its saved quantized weights and replay
    on_quantized from the saved results."""
    if prepare_block is not None:
        prepare_block(block)
    set_act_quant(block, acts_on)
    weights, results = resume.load_block(i)
    with torch.no_grad():
        for name, w in weights.items():
            _weight_module(block.get_submodule(name)).weight.copy_(w)
    if on_quantized is not None:
        if results is None:
            raise ResumeError(f"--resume: block {i} was saved without the quantization results an export needs; "
                              f"delete {resume.directory} and run again")
        for name, res in results.items():
            on_quantized(i, name, res)


def _fmt(rec: dict) -> str:
    if "loss" not in rec:
        return f"{rec['name']} {rec.get('fallback', 'done')}"
    s = f"{rec['name']} loss={rec['loss']:.4g}"
    if "asym_loss" in rec:
        s += f" asym={rec['asym_loss']:.4g}"
    return s
