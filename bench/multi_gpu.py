"""Multi-GPU speed-up of the layer-by-layer quantization (torchrun, one process per GPU).

Every rank builds the same random-weight Llama-shaped model from a config (Llama-2-7B widths, `--layers` decoder
layers; nothing is downloaded, no `datasets` / `lm_eval`), then runs fake_quant's pipeline (`common.runs.llm.quantize`:
QuaRot rotation, quantizers, `common.pipeline.driver.quantize_blocks`) on random calibration tokens sharded over the ranks.
Rank 0 records, under the number of processes in `--out`: the driver's wall time (capture + solves + both streams,
all layers, between two barriers), the whole quantize call (with the CPU rotation), peak GPU memory per rank, and
a SHA-256 of the quantized decoder weights (equal on every rank, and equal to the 1-process run's when the sums
agree to the bit).  Run once per process count, then read the table it prints (speed-up over 1 process):

    for n in 1 2; do torchrun --nproc_per_node $n bench/multi_gpu.py --out bench/results/multi_gpu.json; done

Extra arguments go to fake_quant's parser (default: --rotate --w_bits 4 --a_bits 4 --gptaq --w_clip).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.pipeline import distributed  # noqa: E402
from common.pipeline import driver  # noqa: E402
from common.models import llm  # noqa: E402
from common.io.results import environment, markdown_table, write_json  # noqa: E402
from common.cli.llm import build_parser, settings  # noqa: E402
from common.models.rotation import Rotation  # noqa: E402
from common.runs.llm import quantize, seed_everything  # noqa: E402

FQ_DEFAULTS = ["--rotate", "--w_bits", "4", "--a_bits", "4", "--gptaq", "--w_clip"]


def parse() -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--bsz", type=int, default=1)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=8,
                   help="CPU threads per process (the rotation runs on the CPU); keep it equal across process "
                        "counts so that the rotated models, and hence the weights, can be compared bit for bit")
    p.add_argument("--out", default="bench/results/multi_gpu.json", help="JSON file, one entry per process count")
    bench, rest = p.parse_known_args()
    fq = build_parser().parse_args(["--model", "random-llama", "--nsamples", str(bench.nsamples), "--seqlen",
                                    str(bench.seqlen), "--bsz", str(bench.bsz), *FQ_DEFAULTS, *rest])
    return bench, fq


def build_model(b: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=b.vocab, hidden_size=b.hidden, intermediate_size=b.intermediate,
                         num_hidden_layers=b.layers, num_attention_heads=b.heads, num_key_value_heads=b.kv_heads,
                         max_position_embeddings=max(4096, b.seqlen), tie_word_embeddings=False)
    torch.manual_seed(0)  # the same weights on every rank
    model = LlamaForCausalLM(config).to(getattr(torch, b.dtype))
    model.config.use_cache = False
    return model.eval()


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(llm.decoder_layers(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()


def main() -> None:
    bench, fq = parse()
    device = distributed.init(bench.device)
    world = distributed.world_size()
    torch.set_num_threads(bench.threads)  # torchrun gives each worker 1 thread otherwise
    seed_everything(fq.seed)
    wcfg, act, kv = settings(fq)
    model = build_model(bench)
    rotation = Rotation.quarot(model.config, fq.rotate_mode, fq.rotation_seed, fq.fp32_had) if fq.rotate else None
    g = torch.Generator().manual_seed(fq.seed)
    cal = [torch.randint(0, bench.vocab, (1, bench.seqlen), generator=g) for _ in range(bench.nsamples)]

    timed = {}
    run_driver = driver.quantize_blocks

    def timed_driver(*args, **kwargs):
        _sync(device)
        t0 = time.time()
        out = run_driver(*args, **kwargs)
        _sync(device)
        timed["driver_s"] = time.time() - t0
        return out

    driver.quantize_blocks = timed_driver  # common.runs.llm.quantize imports it at call time
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.time()
    quantize(model, fq, wcfg, act, kv, cal, device, rotation)
    _sync(device)
    quantize_s = time.time() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    digest = weights_sha256(model)
    per_rank = distributed.all_gather_object({"peak_gib": peak, "sha256": digest})
    if distributed.is_main():
        record = {"world_size": world, "device": str(device), "layers": bench.layers,
                  "shape": {k: getattr(bench, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab")},
                  "threads": bench.threads, "nsamples": bench.nsamples, "seqlen": bench.seqlen, "bsz": bench.bsz,
                  "dtype": bench.dtype,
                  "flags": FQ_DEFAULTS + sys.argv[1:], "method": wcfg.method,
                  "driver_s": round(timed["driver_s"], 3),
                  "driver_s_per_layer": round(timed["driver_s"] / bench.layers, 3),
                  "quantize_s": round(quantize_s, 3),
                  "peak_gib_per_rank": [None if r["peak_gib"] is None else round(r["peak_gib"], 3) for r in per_rank],
                  "weights_sha256": digest, "ranks_agree": len({r["sha256"] for r in per_rank}) == 1,
                  "environment": environment()}
        results = json.load(open(bench.out)) if os.path.isfile(bench.out) else {}
        results[str(world)] = record
        write_json(bench.out, results)
        base = results.get("1")
        rows = [{"processes": r["world_size"], "driver s": r["driver_s"], "s/layer": r["driver_s_per_layer"],
                 "speed-up": round(base["driver_s"] / r["driver_s"], 2) if base else None,
                 "same weights as 1": (r["weights_sha256"] == base["weights_sha256"]) if base else None,
                 "ranks agree": r["ranks_agree"], "peak GiB/rank": max(x or 0 for x in r["peak_gib_per_rank"])}
                for _, r in sorted(results.items(), key=lambda kv: int(kv[0]))]
        print(markdown_table(rows, digits=3))
        print(f"wrote {bench.out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
