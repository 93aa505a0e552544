"""End-to-end scale benchmark: fake_quant's streamed pipeline, W4A4 with QuaRot rotation and GPTAQ (and GPTQ), on a
Llama-2-7B-shaped model with random weights.

The model (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000; weights N(0, 0.02), norms 1; the work
does not depend on the values) is written once as sharded safetensors to --model_dir and reused while it exists.
Each method then runs `common.runs.llm.quantize_streamed` (the code behind `fake_quant/main.py --stream`) on
--nsamples random-token sequences of --seqlen tokens and the streamed perplexity on --eval_windows random windows,
with the flags `--rotate --w_bits 4 --a_bits 4 --w_clip --a_clip_ratio 0.9 [--gptaq]`. Reported per method: wall
seconds of every phase of the quantization, summed over layers: capture (H, dXXT), solve, stream forward, copy
(layer to the device, quantizers, GPTAQ's FP copy) and release (common.pipeline.driver); read (waiting for the
background read of the layer), prepare (rotation, quantizers) and write (host copy, handing the shard to the
background writer) (common.pipeline.streaming); setup (embedding / lm_head, the embedding pass, waiting for the
Triton kernels compiled meanwhile (common.pipeline.prewarm), publishing); "other" = the rest of the wall time
(unaccounted); evaluation; peak GPU memory of the quantization and of the evaluation next to the estimate "one
decoder layer (two for GPTAQ) + the input stream(s) + the largest H (and dXXT)"; peak host RSS (VmHWM). With
--layers N < 32 an N-layer model of the same shapes is used and the per-layer phases are also extrapolated to 32
layers (keys marked "extrapolated_32"; its "quantize_s" is the measured run plus the missing layers at the median of
the layers after the first, which carries compilation).

    python bench/e2e_llm.py --methods gptaq gptq --json bench/results/e2e_llama7b.json     # one GPU
    python bench/e2e_llm.py --smoke                                                          # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.models import llm  # noqa: E402
from common.pipeline import streaming  # noqa: E402
from common.eval.perplexity import perplexity  # noqa: E402
from common.io.results import environment, git_commit, markdown_table, write_json  # noqa: E402
from common.cli.llm import parse_args, settings  # noqa: E402
from common.runs.llm import quantize, quantize_streamed, rotation_of  # noqa: E402

FULL_LAYERS = 32
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=256, rms_norm_eps=1e-5)
# per-layer phases (common.pipeline.driver's block_times + common.pipeline.streaming's layer I/O), summed over layers
PHASES = ("capture_s", "solve_s", "forward_s", "read_s", "prepare_s", "copy_s", "write_s", "release_s")
PREPARE_STEPS = ("to_device_s", "rotate_s", "quantizers_s")  # prepare_s by step
W4A4_ROTATED = ["--rotate", "--w_bits", "4", "--a_bits", "4", "--w_clip", "--a_clip_ratio", "0.9"]
GIB = 2**30


def model_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       architectures=["LlamaForCausalLM"], **shape)


def _same_model(directory: str, config) -> bool:
    try:
        with open(os.path.join(directory, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in config.to_diff_dict().items() if k in ("num_hidden_layers", *LLAMA2_7B))


@torch.no_grad()
def make_random_checkpoint(directory: str, config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
    """Write a random model of `config` layer by layer (host memory: one layer): weights N(0, 0.02) drawn on
    `device` from per-tensor seeds, norm scales 1.  Reuses an existing checkpoint of the same shapes."""
    if os.path.isdir(directory) and os.listdir(directory):
        if _same_model(directory, config):
            return
        raise SystemExit(f"error: --model_dir {directory} exists and holds another model; remove it or pick another")
    model = streaming.build_skeleton(config, dtype)
    writer = streaming.CheckpointWriter(directory, nshards=1 + config.num_hidden_layers)
    counter = iter(range(10**9))

    def draw(module: torch.nn.Module, prefix: str, outer_only: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, key in streaming.checkpoint_names(module, prefix).items():
            if outer_only and key.startswith(streaming.LAYERS_PREFIX):
                continue
            shape = module.get_parameter(name).shape
            if "norm" in name:
                t = torch.ones(shape, device=device)
            else:
                g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + next(counter))
                t = torch.randn(shape, generator=g, device=device).mul_(0.02)
            out[key] = t.to(dtype).cpu()
        return out

    try:
        writer.write(draw(model, "", outer_only=True))
        for i, layer in enumerate(llm.decoder_layers(model)):
            writer.write(draw(layer, f"{streaming.LAYERS_PREFIX}{i}."))
        writer.finish(model.config)
    except BaseException:
        writer.abort()
        raise


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def host_peak_gib() -> float | None:
    """Peak resident set of this process (VmHWM; Linux), GiB."""
    try:
        with open("/proc/self/status") as f:
            return round(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 2**20, 3)
    except (OSError, StopIteration):
        return None


def memory_estimate_gib(config, dtype: torch.dtype, nsamples: int, seqlen: int, gptaq: bool, offload: bool) -> dict:
    """What the GPU should hold while a layer is quantized: the layer (and GPTAQ's full-precision copy), the
    calibration stream(s) X~ (and X) unless offloaded, and the statistics of the largest group of linears
    (float64 sums of H, and dXXT: [k,v,q] 3 x hidden^2 or [down] intermediate^2).  Solver temporaries come on top."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    size = torch.finfo(dtype).bits // 8
    copies = 2 if gptaq else 1
    layer = (2 * h * h + 2 * h * kv + 3 * h * m) * size * copies
    streams = 0 if offload else nsamples * seqlen * h * size * copies
    stats = max(3 * h * h, m * m) * 8 * copies
    return {k: round(v / GIB, 3) for k, v in
            {"layer": layer, "streams": streams, "stats": stats, "total": layer + streams + stats}.items()}


def run_method(method: str, a: argparse.Namespace, model_dir: str, device: torch.device, cal: list[torch.Tensor],
               windows: torch.Tensor, config) -> dict:
    argv = ["--model", model_dir, "--dtype", a.dtype, "--device", str(device), "--nsamples", str(a.nsamples),
            "--seqlen", str(a.seqlen), "--bsz", str(a.bsz), "--seed", str(a.seed), "--stream", *W4A4_ROTATED]
    argv += ["--gptaq"] if method == "gptaq" else []
    argv += ["--offload_inputs"] if a.offload_inputs else []
    argv += ["--cuda_graphs"] if a.cuda_graphs else []
    args = parse_args(argv)
    args.dtype = a.dtype
    wcfg, act, kv = settings(args)
    qdir = os.path.join(os.path.dirname(os.path.abspath(model_dir)), f".e2e_{method}_qmodel")
    shutil.rmtree(qdir, ignore_errors=True)
    block_times: list[dict] = []
    setup_times: dict = {}
    try:
        _reset_peak(device)
        t0 = time.perf_counter()
        quantize_streamed(args, wcfg, act, kv, cal, device, None, qdir, rotation_of(args), block_times, setup_times)
        _sync(device)
        quantize_s = time.perf_counter() - t0
        peak_quantize = _peak_gib(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        model, open_layer, _ = streaming.open_quantized(qdir, device, a.dtype)
        ppl = perplexity(model, windows, bsz=a.bsz, device=device, open_layer=open_layer, desc=f"ppl {method}")
        _sync(device)
        eval_s = time.perf_counter() - t0
        peak_eval = _peak_gib(device)
    finally:
        shutil.rmtree(qdir, ignore_errors=True)
    phases = {k: round(sum(b.get(k, 0.0) for b in block_times), 2) for k in PHASES}
    prepare_steps = {k: round(sum(b.get("prepare", {}).get(k, 0.0) for b in block_times), 2) for k in PREPARE_STEPS}
    phases["setup_s"] = round(sum(setup_times.values()), 2)
    row = {"method": method, "layers": config.num_hidden_layers, "tokens": a.nsamples * a.seqlen, **phases,
           "other_quantize_s": round(quantize_s - sum(phases.values()), 2), "quantize_s": round(quantize_s, 2),
           "eval_s": round(eval_s, 2), "peak_gpu_quantize_gib": peak_quantize, "peak_gpu_eval_gib": peak_eval,
           "estimate_gpu_gib": memory_estimate_gib(config, llm.DTYPES[a.dtype], a.nsamples, a.seqlen,
                                                   method == "gptaq", a.offload_inputs)["total"],
           "ppl_random_model": round(ppl, 3), "prepare_steps": prepare_steps, "setup_times": setup_times,
           "block_times": block_times}
    if config.num_hidden_layers < FULL_LAYERS and not a.smoke:
        scale = FULL_LAYERS / config.num_hidden_layers
        row["extrapolated_32"] = {k: round(v * scale, 1) for k, v in phases.items() if k != "setup_s"}
        row["extrapolated_32"]["per_layer_quantize_s"] = round(quantize_s / config.num_hidden_layers, 2)
        if config.num_hidden_layers > 1:  # the measured run plus the missing layers at the steady layers' median
            steady = statistics.median(sum(b.get(k, 0.0) for k in PHASES) for b in block_times[1:])
            row["extrapolated_32"]["steady_layer_s"] = round(steady, 2)
            row["extrapolated_32"]["quantize_s"] = round(quantize_s + (FULL_LAYERS - config.num_hidden_layers)
                                                         * steady, 1)
    return row


def run_in_memory(method: str, a: argparse.Namespace, model_dir: str, device: torch.device,
                  cal: list[torch.Tensor]) -> dict:
    """The same method on the whole model loaded into host memory (fake_quant/main.py without --stream):
    load, then `common.runs.llm.quantize` (rotation of the whole model, then the layer-by-layer solve)."""
    argv = ["--model", model_dir, "--dtype", a.dtype, "--device", str(device), "--nsamples", str(a.nsamples),
            "--seqlen", str(a.seqlen), "--bsz", str(a.bsz), "--seed", str(a.seed), *W4A4_ROTATED]
    argv += ["--gptaq"] if method == "gptaq" else []
    argv += ["--offload_inputs"] if a.offload_inputs else []
    argv += ["--cuda_graphs"] if a.cuda_graphs else []
    args = parse_args(argv)
    args.dtype = a.dtype
    wcfg, act, kv = settings(args)
    _reset_peak(device)
    t0 = time.perf_counter()
    model = llm.load_model(model_dir, a.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    quantize(model, args, wcfg, act, kv, cal, device, rotation_of(args))
    _sync(device)
    quantize_s = time.perf_counter() - t0
    del model
    return {"method": f"{method} (in memory)", "load_s": round(load_s, 2), "quantize_s": round(quantize_s, 2),
            "peak_gpu_quantize_gib": _peak_gib(device), "host_peak_rss_gib": host_peak_gib()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=["gptaq", "gptq"], default=["gptaq", "gptq"])
    p.add_argument("--model_dir", default=None,
                   help="random checkpoint cache (default outputs/e2e/llama2-7b-random-L<layers>, smoke: ...-smoke)")
    p.add_argument("--layers", type=int, default=FULL_LAYERS,
                   help=f"decoder layers of the model (< {FULL_LAYERS}: per-layer phases extrapolated, labelled)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bsz", type=int, default=1)
    p.add_argument("--eval_windows", type=int, default=16, help="random-token perplexity windows of --seqlen")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--offload_inputs", action="store_true", help="calibration streams in pinned CPU memory")
    p.add_argument("--cuda_graphs", action="store_true", help="layer passes replayed from CUDA graphs (--cuda_graphs)")
    p.add_argument("--in_memory", action="store_true",
                   help="also run each method on the whole model in host memory (no --stream), for the comparison")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check: 2 tiny layers, 4 x 64 tokens, float32 (overrides the size flags)")
    p.add_argument("--json", default=None, help="results file (default outputs/e2e/e2e_llm[_smoke].json)")
    a = p.parse_args(argv)
    shape = LLAMA2_7B
    if a.smoke:
        shape, a.layers, a.nsamples, a.seqlen, a.eval_windows, a.dtype = SMOKE, 2, 4, 64, 2, "float32"
        a.device = a.device or "cpu"
    for flag in ("layers", "nsamples", "seqlen", "bsz", "eval_windows"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    tag = "smoke" if a.smoke else f"L{a.layers}"
    model_dir = a.model_dir or os.path.join("outputs", "e2e", f"llama2-7b-random-{tag}")
    config = model_config(shape, a.layers)

    t0 = time.perf_counter()
    make_random_checkpoint(model_dir, config, llm.DTYPES[a.dtype], device, a.seed)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(a.seed)
    cal = [torch.randint(0, shape["vocab_size"], (1, a.seqlen), generator=g) for _ in range(a.nsamples)]
    windows = torch.randint(0, shape["vocab_size"], (a.eval_windows, a.seqlen), generator=g)
    rows = [run_method(m, a, model_dir, device, cal, windows, config) for m in a.methods]
    in_memory = [run_in_memory(m, a, model_dir, device, cal) for m in a.methods] if a.in_memory else []

    columns = ["method", "layers", "tokens", *PHASES, "setup_s", "other_quantize_s", "quantize_s",
               "eval_s", "peak_gpu_quantize_gib", "peak_gpu_eval_gib", "estimate_gpu_gib"]
    print(markdown_table(rows, columns))
    for r in rows:
        print(f"{r['method']}: prepare_s by step {r['prepare_steps']}")
    if in_memory:
        print(markdown_table(in_memory, ["method", "load_s", "quantize_s", "peak_gpu_quantize_gib",
                                         "host_peak_rss_gib"]))
        streamed = {r["method"]: r["quantize_s"] for r in rows}
        for r in in_memory:
            m = r["method"].split()[0]
            print(f"{m}: --stream / in memory = {streamed[m] / r['quantize_s']:.2f} (quantize phase)")
    for r in rows:
        if "extrapolated_32" in r:
            print(f"{r['method']}: EXTRAPOLATED to 32 layers from {r['layers']}: {r['extrapolated_32']}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    command = " ".join(["python", "bench/e2e_llm.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"benchmark": "e2e_llm", "device": name, "command": command,
              "settings": {**vars(a), "flags": W4A4_ROTATED, "model": config.to_diff_dict()},
              "build_checkpoint_s": round(build_s, 2), "host_peak_rss_gib": host_peak_gib(), "rows": rows,
              "in_memory": in_memory,
              "memory_estimate_gib": {m: memory_estimate_gib(config, llm.DTYPES[a.dtype], a.nsamples, a.seqlen,
                                                              m == "gptaq", a.offload_inputs) for m in a.methods},
              "git_commit": git_commit(), "environment": environment()}
    path = a.json or os.path.join("outputs", "e2e", f"e2e_llm{'_smoke' if a.smoke else ''}.json")
    write_json(path, result)
    print(f"wrote {path} (checkpoint build {build_s:.1f} s, host peak RSS {result['host_peak_rss_gib']} GiB)")
    return result


if __name__ == "__main__":
    main()
