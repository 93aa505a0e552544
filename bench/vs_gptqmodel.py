"""Weight-only GPTQ and GPTAQ side by side with GPTQModel on the quick-start assets: perplexity and quantize time.

Usage (CPU; GPTQModel wants GPTQMODEL_CPU_WORKERS set to the core count on a small machine):
    pip install -e '.[gptq]'        # gptqmodel 7.7 (+ optimum); tested with 7.7.0
    GPTQMODEL_CPU_WORKERS=2 python bench/vs_gptqmodel.py [--nsamples 64 --seqlen 512 --eval_limit 64]

Both tools get the same calibration token windows (`common.data.text.get_calibration_data`, seed 0, from --cal) and
are scored with the same code (`common.eval.perplexity.perplexity`) on the same held-out windows of --eval.
Setting: W --bits, group --group_size, symmetric, dampening --percdamp, GPTAQ alpha --alpha, no act-order (GPTQModel:
desc_act=False and act_group_aware=False, its own group reordering off), float32 weights.
- ours: `fake_quant/main.py` (no rotation, no activation quantization), once per symmetric grid in --sym_grids
  ("quarot", our default, and "gptq", GPTQModel's scale = 2 amax / (2^b - 1)); time = its "quantize" phase.
- GPTQModel: `GPTQModel.load(model, QuantizeConfig(...))` then `.quantize(windows)` (timed), saved and reloaded with
  GPTQModel's pure-PyTorch kernel for the perplexity.  GPTQModel 7.7 ignores unknown config arguments (`v2=True` is plain
  GPTQ): its GPTAQ is `QuantizeConfig(gptaq=GPTAQConfig(alpha=...))`, and this script checks that it took.  The
  saved checkpoint is reloaded in float32 through transformers (GPTQConfig backend "gptq_torch", needs optimum).
Without gptqmodel the script says so and exits 0 (nothing is run).  Results: a markdown table and --json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.data.text import get_calibration_data, get_eval_data  # noqa: E402
from common.eval.perplexity import perplexity  # noqa: E402
from common.models import llm  # noqa: E402


def ours(a: argparse.Namespace, method: str, sym_grid: str, out: str) -> dict:
    from fake_quant.main import main

    argv = ["--model", a.model, "--dtype", "float32", "--device", "cpu", "--w_bits", str(a.bits), "--w_groupsize",
            str(a.group_size), "--percdamp", str(a.percdamp), "--w_sym_grid", sym_grid, "--nsamples", str(a.nsamples),
            "--seqlen", str(a.seqlen), "--cal_dataset", a.cal, "--eval_dataset", a.eval, "--eval_limit",
            str(a.eval_limit), "--seed", str(a.seed), "--output_dir", out]
    if method == "gptaq":
        argv += ["--gptaq", "--alpha", str(a.alpha)]
    r = main(argv)
    return {"ppl": r["perplexity"][a.eval], "quantize_s": r["time_s"]["quantize"]}


def gptqmodel_run(a: argparse.Namespace, method: str, cal: list[torch.Tensor], windows: torch.Tensor,
                  workdir: str) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig

    qcfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, desc_act=False, act_group_aware=False,
                          damp_percent=a.percdamp, gptaq=GPTAQConfig(alpha=a.alpha) if method == "gptaq" else None)
    if (getattr(qcfg, "gptaq", None) is not None) != (method == "gptaq"):
        raise SystemExit(f"GPTQModel's QuantizeConfig did not take gptaq=...: {qcfg}")
    model = GPTQModel.load(a.model, qcfg, dtype=torch.float32, device="cpu")
    samples = [{"input_ids": x.reshape(1, -1), "attention_mask": torch.ones(1, x.numel(), dtype=torch.long)}
               for x in cal]
    t0 = time.perf_counter()
    model.quantize(samples, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - t0
    path = os.path.join(workdir, f"gptqmodel_{method}")
    model.save(path)
    del model
    from transformers import AutoModelForCausalLM, GPTQConfig

    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu",
                                             quantization_config=GPTQConfig(bits=a.bits, backend="gptq_torch"))
    ppl = perplexity(q, windows, bsz=1, device="cpu")
    return {"ppl": ppl, "quantize_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/smollm2-135m")
    p.add_argument("--cal", default="assets/pydoc/cal.txt")
    p.add_argument("--eval", default="assets/pydoc/eval.txt")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval_limit", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["gptq", "gptaq"], choices=["gptq", "gptaq"])
    p.add_argument("--sym_grids", nargs="+", default=["quarot", "gptq"], choices=["quarot", "gptq"],
                   help="our symmetric grid conventions to run")
    p.add_argument("--skip_ours", action="store_true")
    p.add_argument("--skip_gptqmodel", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    have = importlib.util.find_spec("gptqmodel") is not None
    if not have and not a.skip_gptqmodel:
        print("bench/vs_gptqmodel.py: gptqmodel is not installed (pip install -e '.[gptq]'); nothing to compare, "
              "skipped")
        return 0
    tok = llm.load_tokenizer(a.model)
    cal = get_calibration_data(a.cal, tok, a.nsamples, a.seqlen, a.seed)
    windows = get_eval_data(a.eval, tok, a.seqlen)[:a.eval_limit]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs_gptqmodel_") as work:
        for method in a.methods:
            if not a.skip_ours:
                for grid in a.sym_grids:
                    r = ours(a, method, grid, os.path.join(work, f"ours_{method}_{grid}"))
                    rows.append({"tool": f"ours (sym_grid {grid})", "method": method, **r})
                    print("row:", json.dumps(rows[-1]), flush=True)
            if not a.skip_gptqmodel:
                import gptqmodel

                r = gptqmodel_run(a, method, cal, windows, work)
                rows.append({"tool": f"GPTQModel {gptqmodel.__version__}", "method": method, **r})
                print("row:", json.dumps(rows[-1]), flush=True)
    print(f"\n{a.model}, W{a.bits} g{a.group_size} sym, damp {a.percdamp}, alpha {a.alpha}, {a.nsamples} x {a.seqlen} "
          f"calibration tokens of {a.cal}, {len(windows)} windows of {a.eval}, CPU float32, "
          f"{torch.get_num_threads()} threads")
    print("| tool | method | ppl | quantize s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['tool']} | {r['method']} | {r['ppl']:.3f} | {r['quantize_s']:.1f} |")
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=2)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
