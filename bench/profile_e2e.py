"""Where a decoder layer's quantization time goes (bench/e2e_llm.py's setting: Llama-2-7B shapes, float16, QuaRot
rotation, W4A4, 2048-token batches), measured piece by piece on one GPU.

Sections (each a median of timed repeats after a warm-up, CUDA synchronized):
  ceilings   the measured fp16 / TF32 matmul rates and the device copy bandwidth (the floors' denominators)
  accumulate H and dXXT per 2048-token batch: the earlier accumulator (TF32 products, float64 sums) against
             HessianAccumulator.add (fp16 tensor cores, float32 GEMM accumulation; dXXT "difference" / "split"),
             each with its error against float64
  act_quant  the per-token quantizer of [2048, 4096] and [2048, 11008] float16 / bfloat16 inputs: PyTorch code
             against the fused Triton kernel (common.quant.act_triton), and whether they agree bit for bit
  act_quant_configs  that quantizer (float16, 4 bits) under other launch configurations and as a two-loop kernel
             over column chunks, against a copy of its input (the bandwidth floor)
  gil        whether a background layer read / shard write slows the main thread's kernel launches
  layer      one layer's pieces of the streamed pipeline: read from safetensors, to the GPU, rotate, quantizers,
             deep copy, write back; forwards per batch (whole layer, up to each group's inputs)
  capture    quantize_blocks' phases on that layer (16 batches) with and without stage-wise capture
  agreement  per linear, isolated (same weights and streams): equal quantized entries when solved from this code's
             statistics, from the accumulation of the issue's "today" and from float64 sums (the noise floor)
  overhead   host or device bound?  quantize_blocks on the layer per method: each driver phase's wall time (unprofiled)
             against its kernel time (torch.profiler, the driver's "capture:" / "solve:" / "forward:" ranges), the
             implicit host-device synchronisations (torch.cuda sync debug mode) by source line; one layer forward's
             issue time against its synchronized time, at batch size 1 and 2
  kernels    torch.profiler over one layer forward (activation quantizers on) and over quantize_blocks on the layer
             (GPTQ and GPTAQ, 16 batches): device time by kernel against wall time (what the GPU waits for)
  fused_norm the fused RMSNorm (common.models.rms_norm) against Hugging Face's on that layer: time per call, equal
             output entries, and per method the fraction of quantized weights equal to a run with Hugging Face's norms
  solve      each linear's quantize_linear (GPTQ, GPTAQ) and its MSE grid fit alone: PyTorch loop and fused kernel
             (common.quant.mse_triton), and how many grids the two choose differently

    python bench/profile_e2e.py --json $OUT/profile_e2e.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.e2e_llm import LLAMA2_7B, SMOKE, W4A4_ROTATED, make_random_checkpoint, model_config  # noqa: E402
from common.cli.llm import parse_args, settings  # noqa: E402
from common.models import llm  # noqa: E402
from common.pipeline import driver, streaming  # noqa: E402
from common.pipeline.hessian import HessianAccumulator  # noqa: E402
from common.quant import act_triton  # noqa: E402
from common.quant.act_quant import ActQuantizer, set_act_quant  # noqa: E402
from common.solver import tf32  # noqa: E402

DEV = torch.device("cuda")
SIZES, TOKENS, SHAPE, NBATCH = (4096, 11008), 2048, LLAMA2_7B, 16  # --smoke: CPU, tiny
GRAPHS_TOO, TOP = True, 12  # overhead: also with CUDA graphs; kernels listed per range (--eager_only, --top)


SECTIONS = ["ceilings", "accumulate", "act_quant", "act_quant_configs", "gil", "layer", "capture", "overhead", "kernels", "agreement",
            "fused_norm", "solve"]


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def ceilings() -> dict:
    m = 8192 if DEV.type == 'cuda' else 256
    a = torch.randn(m, m, device=DEV, dtype=torch.float16)
    t16 = timed(lambda: a @ a, 10)
    af = a.float()
    with tf32.tf32(True):
        t32 = timed(lambda: af @ af, 10)
    big = torch.empty(2**28 if DEV.type == 'cuda' else 2**20, device=DEV, dtype=torch.float32)
    tc = timed(lambda: big.clone(), 10)
    return {"fp16_tflops": 2 * m**3 / t16 / 1e12, "tf32_tflops": 2 * m**3 / t32 / 1e12,
            "copy_gbps": 2 * big.numel() * 4 / tc / 1e9}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _old_add(S64: torch.Tensor, D64: torch.Tensor | None, xt16: torch.Tensor, x16: torch.Tensor | None) -> None:
    """The accumulator before this change: TF32 products of the float32 copies, added to float64 sums."""
    xt = xt16.float()
    with tf32.tf32(True):
        S64.add_(xt.t() @ xt)
        if D64 is not None:
            hi, lo = tf32.split(x16.float() - xt)
            D64.add_(torch.addmm(hi.t() @ xt, lo.t(), xt))


def accumulate() -> dict:
    from common.pipeline import hessian

    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    q = ActQuantizer(bits=4, clip_ratio=0.9)
    for n in SIZES:
        mix = torch.randn(n, n, device=DEV, generator=g) / n**0.5 + torch.eye(n, device=DEV)
        x = (torch.randn(TOKENS, n, device=DEV, generator=g) @ mix).half()  # full-precision input
        xt = q(x + 0.05 * torch.randn(TOKENS, n, device=DEV, generator=g).half())  # quantized stream, A4
        X, Xt = x.double(), xt.double()
        S_ref, D_ref = Xt.t() @ Xt, (X - Xt).t() @ Xt
        r = {"rel_dx": float((X - Xt).norm() / X.norm())}
        S64 = torch.zeros(n, n, device=DEV, dtype=torch.float64)
        D64 = torch.zeros_like(S64)
        r["old_H_ms"] = 1e3 * timed(lambda: _old_add(S64, None, xt, None))
        r["old_HD_ms"] = 1e3 * timed(lambda: _old_add(S64, D64, xt, x))
        S64.zero_(), D64.zero_()
        _old_add(S64, D64, xt, x)
        r["old_err_S"], r["old_err_D"] = _rel(S64, S_ref), _rel(D64, D_ref)
        del S64, D64
        for form in hessian.DXXT_PRODUCTS:
            acc = HessianAccumulator(n, DEV, False)
            r["new_H_ms"] = 1e3 * timed(lambda: acc.add(xt))
            acc = HessianAccumulator(n, DEV, True, dxxt_product=form)
            r[f"new_HD_{form}_ms"] = 1e3 * timed(lambda: acc.add(xt, x))
            one = HessianAccumulator(n, DEV, True, dxxt_product=form)
            one.add(xt, x)
            H, D = one.H.double() * (TOKENS / 2), one.dXXT.double() * (TOKENS / 2)
            r["new_err_S"], r[f"new_err_D_{form}"] = _rel(H, S_ref), _rel(D, D_ref)
            del acc, one, H, D
        r["gemm_accumulate_ok"] = hessian._gemm_accumulate_ok(DEV) if DEV.type == "cuda" else None
        out[n] = r
        del mix, x, xt, X, Xt, S_ref, D_ref
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return out


def gil(tmp: str) -> dict:
    """Does a background read / shard write stall the main thread's kernel launches (the GIL)?  Main thread:
    a loop of 3000 tiny launches, alone and while a thread reads or writes a 7B layer's worth of tensors."""
    import threading

    from safetensors.torch import save_file

    n = 4096 if DEV.type == "cuda" else 64
    tensors = {f"t{i}": torch.randn(n * (11008 if DEV.type == "cuda" else 96) // 4096, n).half() for i in range(7)}
    path = os.path.join(tmp, "gil.safetensors")
    save_file(tensors, path)
    ckpt = streaming.SafetensorsCheckpoint.__new__(streaming.SafetensorsCheckpoint)
    ckpt.directory, ckpt.files = tmp, {k: "gil.safetensors" for k in tensors}
    x = torch.zeros(1, device=DEV)

    def launches():
        for _ in range(3000):
            x.add_(1)

    r = {"launch_loop_alone_ms": 1e3 * timed(launches, 5)}
    for label, work in (("read", lambda: ckpt.read(list(tensors), torch.float16)),
                        ("write", lambda: save_file(tensors, path + ".w"))):
        t0 = time.perf_counter()
        work()
        r[f"{label}_alone_s"] = time.perf_counter() - t0
        stop = threading.Event()

        def loop():
            while not stop.is_set():
                work()

        th = threading.Thread(target=loop)
        th.start()
        time.sleep(0.05)
        r[f"launch_loop_during_{label}_ms"] = 1e3 * timed(launches, 5)
        stop.set()
        th.join()
    return r


def act_quant() -> dict:
    out = {}
    g = torch.Generator(device=DEV).manual_seed(1)
    for n, dtype in [(n, d) for n in SIZES for d in (torch.float16, torch.bfloat16)]:
        x = (torch.randn(TOKENS, n, device=DEV, generator=g) * torch.rand(n, device=DEV, generator=g) * 3).to(dtype)
        r = {}
        for label, kw in (("asym", dict(bits=4, clip_ratio=0.9)), ("sym", dict(bits=4, sym=True)),
                          ("g32", dict(bits=4, groupsize=32, clip_ratio=0.9)), ("a8", dict(bits=8)),
                          ("kv_g128", dict(bits=4, groupsize=32 if DEV.type == "cpu" else 128, clip_ratio=0.95))):
            q = ActQuantizer(**kw)
            q.fused = False
            ref = q(x)
            t_torch = timed(lambda: q(x), 10)
            q.fused = True
            got = q(x)
            r[label] = {"torch_ms": 1e3 * t_torch, "fused_ms": 1e3 * timed(lambda: q(x), 10),
                        "bitwise_equal": bool(torch.equal(got, ref)),
                        "mismatches": int((got != ref).sum())}
        out[f"{n}_{str(dtype).split('.')[-1]}"] = r
    return out


def act_quant_configs() -> dict:
    """The fused per-token quantizer (4 bits, asymmetric, clip 0.9) on [2048, n] float16 under other launch
    configurations (`common.quant.act_triton.launch`: whole rows per program, or one row in chunks, and warps),
    against a copy of the same tensor (the bandwidth floor: read once, write once); triton's do_bench medians in
    microseconds, whether each output equals the library's bit for bit, and the fastest equal configuration
    ("best", the form of act_triton.LAUNCH)."""
    import triton
    from triton.testing import do_bench

    out = {}
    g = torch.Generator(device=DEV).manual_seed(1)
    for n in SIZES:
        x = (torch.randn(TOKENS, n, device=DEV, generator=g) * torch.rand(n, device=DEV, generator=g) * 3).half()
        ref = act_triton.fake_quantize_rows(x, n, 4, False, 0.9)
        r = {"copy_us": 1e3 * do_bench(lambda: x.clone(), return_mode="median"),
             "library_us": 1e3 * do_bench(lambda: act_triton.fake_quantize_rows(x, n, 4, False, 0.9),
                                         return_mode="median"),
             "library": list(act_triton.LAUNCH.get(n) or act_triton.default_launch(n))}
        configs = [("rows", rows, w) for rows in (1, 2, 4) for w in (4, 8, 16)
                   if rows * triton.next_power_of_2(n) <= 32768]
        configs += [("chunks", c, w) for c in (1024, 2048, 4096) for w in (4, 8)]
        y = torch.empty_like(x)
        best = None
        for cfg in configs:
            act_triton.launch(x, y, n, 4, False, 0.9, cfg)
            us = 1e3 * do_bench(lambda cfg=cfg: act_triton.launch(x, y, n, 4, False, 0.9, cfg), return_mode="median")
            equal = bool(torch.equal(y, ref))
            r["_".join(map(str, cfg))] = [round(us, 2), equal]
            if equal and (best is None or us < best[1]):
                best = (cfg, us)
        r["best"], r["best_us"] = list(best[0]), best[1]
        out[str(n)] = r
    return out


def layer_pieces(tmp: str) -> tuple[dict, object]:
    """One streamed layer's pieces, as common.pipeline.streaming.quantize_checkpoint runs them."""
    from common.models.rotation import Rotation, check_rotations, rotate_layer

    config = model_config(SHAPE, 1)
    ckdir = os.path.join(tmp, "ckpt")
    make_random_checkpoint(ckdir, config, torch.float16, DEV)
    args = parse_args(["--model", ckdir, "--dtype", "float16", "--nsamples", str(NBATCH), "--seqlen", str(TOKENS),
                       "--stream", *W4A4_ROTATED, "--gptaq"])
    wcfg, act, kv = settings(args)
    rot = Rotation.quarot(config)
    r: dict = {}
    ckpt = streaming.SafetensorsCheckpoint(ckdir)
    model = streaming.build_skeleton(config, torch.float16)
    R1, R2s = check_rotations(model, rot.R1, rot.R2)
    R1, R2s = R1.to(DEV), [x.to(DEV) for x in R2s]
    streaming._load_outer(model, ckpt, torch.float16)
    streaming.rotate_outer(model, R1, DEV)
    layer = llm.decoder_layers(model)[0]
    prefix = f"{streaming.LAYERS_PREFIX}0."
    names = streaming.checkpoint_names(layer, prefix)
    t0 = time.perf_counter()
    tensors = ckpt.read(list(names.values()), torch.float16)
    r["read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    layer.load_state_dict({n: tensors[k] for n, k in names.items()}, strict=False, assign=True)
    del tensors
    layer.to(DEV)
    _sync()
    r["to_device_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rotate_layer(layer, R1, R2s[0], online_r4=True, fp32_had=False)
    _sync()
    r["rotate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.install_layer_quantizers(layer, act, kv)
    llm.make_prepare_layer(act)(layer)
    _sync()
    r["quantizers_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp = copy.deepcopy(layer)
    _sync()
    r["deepcopy_s"] = time.perf_counter() - t0
    del fp
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(0, SHAPE['vocab_size'], (1, TOKENS), generator=g) for _ in range(NBATCH)]
    inputs = llm.capture_layer_inputs(model, cal, DEV)
    inputs2 = llm.capture_layer_inputs(model, [torch.cat(cal[i:i + 2]) for i in range(0, len(cal) - 1, 2)], DEV)
    xs = inputs.inputs
    fwd = {}
    with torch.no_grad():
        for acts in (False, True):
            set_act_quant(layer, acts)
            fwd[f"layer_acts_{acts}_ms"] = 1e3 * timed(lambda: [inputs.run_layer(layer, x) for x in xs], 3) / len(xs)
            for gi, group in enumerate(llm.sublayer_groups(layer)):
                rec = driver._GroupRecorder(layer, group, lambda n, x: None)
                fwd[f"to_group{gi}_acts_{acts}_ms"] = 1e3 * timed(
                    lambda: [rec.run(inputs.run_layer, layer, x) for x in xs], 3) / len(xs)
                rec.remove()
        for m in layer.modules():
            if isinstance(m, ActQuantizer):
                m.fused = False
        fwd["layer_acts_True_unfused_ms"] = 1e3 * timed(lambda: [inputs.run_layer(layer, x) for x in xs], 3) / len(xs)
        for m in layer.modules():
            if isinstance(m, ActQuantizer):
                m.fused = True
    r["forward_per_batch"] = fwd
    writer = streaming.CheckpointWriter(os.path.join(tmp, "out"), nshards=2)
    params = dict(layer.named_parameters())
    t0 = time.perf_counter()
    cpu = {k: params[n].detach().cpu() for n, k in streaming.checkpoint_names(layer, prefix).items()}
    r["to_host_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.write(cpu)
    r["write_s"] = time.perf_counter() - t0
    writer.abort()
    return r, (layer, inputs, wcfg, inputs2)


def capture(layer, inputs, wcfg, _inputs2=None) -> dict:
    """quantize_blocks on the layer (a copy each time) with and without stages: the driver's phases."""
    from dataclasses import replace

    from common.pipeline.driver import quantize_blocks

    out = {}
    for method in ("gptq", "gptaq"):
        for staged in (False, True):
            blk = copy.deepcopy(layer)
            times: list[dict] = []
            quantize_blocks([blk], list(inputs.inputs), inputs.run_layer, llm.sublayer_groups,
                            replace(wcfg, method=method), device=DEV, desc="profile", block_times=times,
                            stages=inputs.stages if staged else None)
            out[f"{method}_{'staged' if staged else 'whole'}"] = times[0]
            del blk
    return out


def _profiled(fn) -> dict:
    """fn() under torch.profiler: wall seconds, the ops' summed self device time (on CUDA: all kernel time; the rest of
    the wall time the GPU waited), the top 25 ops by it."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    _sync()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        _sync()
        wall = time.perf_counter() - t0
    key = "self_device_time_total" if DEV.type == "cuda" else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    return {"wall_s": wall, "self_time_s": sum(getattr(e, key, 0.0) for e in ev) / 1e6,
            "top": [{"op": e.key[:90], "calls": e.count, "self_ms": getattr(e, key, 0.0) / 1e3} for e in ev[:25]]}


def _kernel_kind(name: str) -> str:
    """A kernel's kind for the per-range summary: matmul, attention, triton (our fused kernels), copy or elementwise."""
    if name.startswith(("nvjet", "sm80_xmma", "sm90_xmma", "cutlass", "void cutlass", "ampere", "sm90_gemm")) or \
            "gemm" in name.lower():
        return "matmul"
    if "sdpa" in name or "flash" in name or "attention" in name:
        return "attention"
    if name.startswith("_") or "triton" in name:
        return "triton"
    if "copy" in name.lower() or "Cat" in name or name.startswith("Memcpy") or name.startswith("Memset"):
        return "copy"
    return "elementwise"


def _range_kernels(prof, top: int = 12) -> dict[str, dict]:
    """Per driver range (host-side events, summed over occurrences): kernel seconds launched inside it, by kind
    (`_kernel_kind`: seconds and launches) and its largest kernels {name: [calls, ms]}."""
    from torch.autograd import DeviceType

    def kernels(e, acc):
        for k in e.kernels:
            calls, ms = acc.get(k.name, (0, 0.0))
            acc[k.name] = (calls + 1, ms + k.duration / 1e3)
        for ch in e.cpu_children:
            kernels(ch, acc)

    out: dict[str, dict] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name.split(":")[0] in ("capture", "solve", "forward"):
            acc = out.setdefault(e.name, {})
            kernels(e, acc)
    def kinds(acc):
        out: dict[str, list] = {}
        for k, (c, ms) in acc.items():
            kind = out.setdefault(_kernel_kind(k), [0, 0.0])
            kind[0] += c
            kind[1] += ms / 1e3
        return {k: [c, round(s, 4)] for k, (c, s) in sorted(out.items())}

    return {name: {"kernel_s": round(sum(ms for _, ms in acc.values()) / 1e3, 4), "by_kind": kinds(acc),
                   "top": {k[:80]: [c, round(ms, 2)]
                           for k, (c, ms) in sorted(acc.items(), key=lambda kv: -kv[1][1])[:top]}}
            for name, acc in out.items()}


def _sync_sources(fn) -> dict[str, int]:
    """fn() under torch.cuda's sync debug mode: the implicit synchronisations it makes, by source line."""
    import collections

    from common.pipeline.graphs import host_syncs

    with host_syncs() as found:
        fn()
    counts = collections.Counter(os.path.relpath(f) for f in found)
    return dict(counts.most_common())


def overhead(layer, inputs, wcfg, inputs2=None) -> dict:
    """Per method, with and without CUDA graphs, quantize_blocks on the layer: phase wall times and peak memory
    (block_times, no profiler, peak reset before), kernel time per phase (profiled run), implicit syncs; then one
    layer forward's issue vs synchronized time, batch size 1 (and 2)."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    from common.pipeline.driver import quantize_blocks

    out: dict = {}
    for method in ("gptq", "gptaq"):
        for graphs in (False, True) if GRAPHS_TOO else (False,):
            def run(times=None):
                blk = copy.deepcopy(layer)
                quantize_blocks([blk], list(inputs.inputs), inputs.run_layer, llm.sublayer_groups,
                                replace(wcfg, method=method), device=DEV, desc="overhead", block_times=times,
                                stages=inputs.stages, cuda_graphs=graphs)
            run()  # warm-up (compiles, cuBLAS handles)
            times: list[dict] = []
            if DEV.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run(times)
            r = {"block_times": times[0]}
            if DEV.type == "cuda":
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    run()
                r["kernels"] = _range_kernels(prof, TOP)
                r["syncs"] = _sync_sources(run)
            out[f"{method}_{'graphs' if graphs else 'eager'}"] = r
    fwd = {}
    with torch.no_grad():
        for acts in (False, True):
            set_act_quant(layer, acts)
            for label, ins in (("bsz1", inputs), ("bsz2", inputs2)):
                if ins is None:
                    continue
                xs = ins.inputs
                tokens = sum(x.shape[0] * x.shape[1] for x in xs)
                _sync()
                t0 = time.perf_counter()
                for x in xs:
                    ins.run_layer(layer, x)
                t_issue = time.perf_counter() - t0
                _sync()
                t_all = time.perf_counter() - t0
                fwd[f"acts_{acts}_{label}"] = {"issue_ms_per_2048": 1e3 * t_issue * 2048 / tokens,
                                               "synced_ms_per_2048": 1e3 * t_all * 2048 / tokens,
                                               "timed_ms_per_2048": 1e3 * timed(
                                                   lambda: [ins.run_layer(layer, x) for x in xs], 3) * 2048 / tokens}
        if DEV.type == "cuda":  # the same forward replayed from a CUDA graph: what the host's share costs
            for acts in (False, True):
                set_act_quant(layer, acts)
                try:
                    fwd[f"acts_{acts}_graphed_ms_per_2048"] = 1e3 * _graphed_forward_s(layer, inputs)
                except Exception as e:  # noqa: BLE001 -- report why the layer cannot be captured
                    fwd[f"acts_{acts}_graphed_error"] = f"{type(e).__name__}: {e}"[:300]
    out["forward"] = fwd
    return out


def _graphed_forward_s(layer, inputs) -> float:
    """Seconds per batch of the layer forward captured once as a CUDA graph and replayed on every batch."""
    xs = inputs.inputs
    static = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            inputs.run_layer(layer, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        inputs.run_layer(layer, static)

    def replay():
        for x in xs:
            static.copy_(x)
            graph.replay()
    return timed(replay, 3) / len(xs)


def kernels(layer, inputs, wcfg, _inputs2=None) -> dict:
    """Where the device time goes in one layer forward and in quantize_blocks on the layer (profiled)."""
    from dataclasses import replace

    from common.pipeline.driver import quantize_blocks

    out = {}
    set_act_quant(layer, True)
    with torch.no_grad():
        for x in inputs.inputs[:2]:
            inputs.run_layer(layer, x)  # warm-up
        out["forward_acts_on_x4"] = _profiled(lambda: [inputs.run_layer(layer, x) for x in inputs.inputs[:4]])
    for method in ("gptq", "gptaq"):
        blk = copy.deepcopy(layer)
        out[f"quantize_blocks_{method}"] = _profiled(lambda: quantize_blocks(
            [blk], list(inputs.inputs), inputs.run_layer, llm.sublayer_groups, replace(wcfg, method=method),
            device=DEV, desc="kernels", stages=inputs.stages))
        del blk
    return out


class _Twin:
    """Sums of the same batches kept another way: "old" = the accumulation when issue 18 was filed (`_old_add`:
    TF32 products of float32 copies, float64 sums), "exact" = float64 products and sums (the float64 truth)."""

    def __init__(self, columns: int, asymmetric: bool, kind: str):
        self.kind, self.nsamples = kind, 0
        self.S = torch.zeros(columns, columns, device=DEV, dtype=torch.float64)
        self.D = torch.zeros_like(self.S) if asymmetric else None

    def add(self, xt: torch.Tensor, x: torch.Tensor | None) -> None:
        xt2, x2 = xt.reshape(-1, xt.shape[-1]), None if x is None else x.reshape(-1, x.shape[-1])
        if self.kind == "old":
            _old_add(self.S, self.D, xt2, x2)
        else:
            X = xt2.double()
            self.S.add_(X.t() @ X)
            if self.D is not None:
                self.D.add_((x2.double() - X).t() @ X)
        self.nsamples += xt2.shape[0]

    def clone(self) -> "_Twin":
        c = copy.copy(self)
        c.S, c.D = self.S.clone(), None if self.D is None else self.D.clone()
        return c

    def stats(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = 2.0 / self.nsamples
        return (self.S * scale).float(), None if self.D is None else (self.D * scale).float()


def agreement(layer, inputs, wcfg, _inputs2=None) -> dict:
    """The only change here that is not exact is how H / dXXT are summed (float32 GEMM accumulation, dXXT by
    difference).  Per linear, isolated: every accumulator of the run has two twins (`_Twin`: the accumulation of
    the issue's "today" and the float64 truth) that sum the same batches; each linear is solved from all three on
    the same weights and streams, and the fractions of equal quantized entries are counted per pair (the run goes
    on with this code's weights).  old_vs_exact is the float32 noise floor of the comparison."""
    from common import solver
    from common.pipeline.driver import quantize_blocks

    init, add, clone, solve_linear = (HessianAccumulator.__init__, HessianAccumulator.add, HessianAccumulator.clone,
                                      driver._solve_linear)
    pairs = ("new_vs_old", "old_vs_exact", "new_vs_exact")
    equal: dict[str, dict[str, int]] = {}

    def twin_init(self, columns, device="cpu", asymmetric=False, *a, **k):
        init(self, columns, device, asymmetric, *a, **k)
        self.twins = {kind: _Twin(columns, asymmetric, kind) for kind in ("old", "exact")}

    def twin_add(self, x_tilde, x=None):
        add(self, x_tilde, x)
        for t in self.twins.values():
            t.add(x_tilde, x)

    def twin_clone(self):
        c = clone(self)
        c.twins = {k: t.clone() for k, t in self.twins.items()}
        return c

    def compared(block, name, acc, cfg, i, desc, keep):
        W = driver._weight_module(block.get_submodule(name)).weight.data
        q = {k: solver.quantize_linear(W.float(), *t.stats(), cfg).weight.to(W.dtype) for k, t in acc.twins.items()}
        out = solve_linear(block, name, acc, cfg, i, desc, keep)
        q["new"] = W
        equal[name] = {p: int((q[p.split("_vs_")[0]] == q[p.split("_vs_")[1]]).sum()) for p in pairs}
        equal[name]["n"] = W.numel()
        return out

    HessianAccumulator.__init__, HessianAccumulator.add, HessianAccumulator.clone = twin_init, twin_add, twin_clone
    driver._solve_linear = compared
    out = {}
    try:
        for method in ("gptq", "gptaq"):
            equal.clear()
            quantize_blocks([copy.deepcopy(layer)], list(inputs.inputs), inputs.run_layer, llm.sublayer_groups,
                            dataclasses.replace(wcfg, method=method), device=DEV, desc="agree", stages=inputs.stages)
            out[method] = {n: {p: e[p] / e["n"] for p in pairs} for n, e in equal.items()}
            total = sum(e["n"] for e in equal.values())
            out[method]["all"] = {p: sum(e[p] for e in equal.values()) / total for p in pairs}
    finally:
        HessianAccumulator.__init__, HessianAccumulator.add, HessianAccumulator.clone = init, add, clone
        driver._solve_linear = solve_linear
    return out


def fused_norm(layer, inputs, wcfg, _inputs2=None) -> dict:
    """The layer's fused RMSNorms against Hugging Face's (the same weights): one call on a batch, and quantize_blocks
    per method on copies of the layer that differ only in their norms (equal quantized weight entries)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from common.pipeline.driver import quantize_blocks

    def with_hf_norms(blk):
        for name in ("input_layernorm", "post_attention_layernorm"):
            fused = getattr(blk, name)
            hf = LlamaRMSNorm(fused.weight.shape[0], eps=fused.variance_epsilon)
            hf.weight = fused.weight
            setattr(blk, name, hf)
        return blk

    x = inputs.inputs[0].to(DEV)
    fused, hf = layer.input_layernorm, with_hf_norms(copy.deepcopy(layer)).input_layernorm
    out: dict = {"norm_class": type(fused).__name__}
    with torch.no_grad():
        out["norm_ms"] = {"fused": 1e3 * timed(lambda: fused(x), 20), "hugging_face": 1e3 * timed(lambda: hf(x), 20)}
        out["norm_output_equal"] = float((fused(x) == hf(x)).float().mean())
    for method in ("gptq", "gptaq"):
        weights = {}
        for kind, blk in (("fused", copy.deepcopy(layer)), ("hugging_face", with_hf_norms(copy.deepcopy(layer)))):
            quantize_blocks([blk], list(inputs.inputs), inputs.run_layer, llm.sublayer_groups,
                            dataclasses.replace(wcfg, method=method), device=DEV, desc=f"norm {kind}",
                            stages=inputs.stages)
            weights[kind] = {n: p.detach().clone() for n, p in blk.named_parameters() if p.dim() == 2}
        total = sum(w.numel() for w in weights["fused"].values())
        same = sum(int((w == weights["hugging_face"][n]).sum()) for n, w in weights["fused"].items())
        out[f"{method}_weights_equal"] = same / total
    return out


def solve(layer, inputs, wcfg, _inputs2=None) -> dict:
    from common import solver
    from common.quant.weight_grid import fit_grid

    out = {}
    set_act_quant(layer, True)
    for group in llm.sublayer_groups(layer):
        stats = driver._capture_group(layer, copy.deepcopy(layer), group, inputs.inputs, inputs.inputs,
                                      inputs.run_layer, DEV, True)
        for name in group[:1]:
            W = driver._weight_module(layer.get_submodule(name)).weight.data.float()
            acc = stats[name]
            H, D = acc.H, acc.dXXT
            r = {"shape": list(W.shape)}
            r["fit_grid_mse_s"] = timed(lambda: fit_grid(W, 4, False, True), 3)
            r["fit_grid_mse_fused_s"] = timed(lambda: fit_grid(W, 4, False, True, fused=True), 3)
            for bits, gs in ((4, -1), (4, 128), (3, 128), (8, -1)):  # rows whose fused search picked another grid
                groups = [W] if gs == -1 else [W[:, c:c + gs] for c in range(0, W.shape[1], gs)]
                differ = sum(int((fit_grid(x, bits, False, True)[0] != fit_grid(x, bits, False, True, fused=True)[0])
                                 .sum()) for x in groups)
                r[f"fused_grid_differs_w{bits}g{gs}"] = f"{differ} of {W.shape[0] * len(groups)} grids"
            for method in ("gptq", "gptaq"):
                cfg = dataclasses.replace(wcfg, method=method)
                r[f"{method}_s"] = timed(lambda: solver.quantize_linear(W, H, D, cfg), 3)
            r["proxy_loss_s"] = timed(lambda: solver.proxy_loss(W, W, H, D), 3)
            out[name] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--tmp", default="outputs/profile_e2e")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (checks that the script runs)")
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--nbatch", type=int, default=16, help="calibration batches of the layer sections")
    p.add_argument("--eager_only", action="store_true", help="overhead: skip the CUDA-graph runs")
    p.add_argument("--top", type=int, default=12, help="overhead: kernels listed per driver range")
    a = p.parse_args()
    global DEV, SIZES, TOKENS, SHAPE, NBATCH, GRAPHS_TOO, TOP
    NBATCH, GRAPHS_TOO, TOP = a.nbatch, not a.eager_only, a.top
    if a.smoke:
        DEV, SIZES, TOKENS, SHAPE = torch.device("cpu"), (64, 96), 64, SMOKE
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__}
    shutil.rmtree(a.tmp, ignore_errors=True)
    os.makedirs(a.tmp)
    for name, fn in (("ceilings", ceilings), ("accumulate", accumulate), ("act_quant", act_quant),
                     ("act_quant_configs", act_quant_configs),
                     ("gil", lambda: gil(a.tmp))):
        if name in a.sections:
            t0 = time.perf_counter()
            res[name] = fn()
            print(name, f"{time.perf_counter() - t0:.1f}s", json.dumps(res[name], indent=1), flush=True)
    if {"layer", "capture", "overhead", "kernels", "agreement", "fused_norm", "solve"} & set(a.sections):
        res["layer"], state = layer_pieces(a.tmp)
        print("layer", json.dumps(res["layer"], indent=1), flush=True)
        for name, fn in (("capture", capture), ("overhead", overhead), ("kernels", kernels), ("agreement", agreement),
                         ("fused_norm", fused_norm), ("solve", solve)):
            if name in a.sections:
                res[name] = fn(*state)
                print(name, json.dumps(res[name], indent=1), flush=True)
                with open(a.json, "w") as f:
                    json.dump(res, f, indent=1)
    shutil.rmtree(a.tmp, ignore_errors=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
