"""Offline quick start for vision transformers: FP vs RTN vs GPTQ vs GPTAQ top-1 at W4A4 and W2A4.

No pretrained ViT and no ImageNet can be downloaded here, so the real benchmark is scikit-learn's 1,797 handwritten
digits written as an ImageFolder and a small timm ViT trained on them from scratch (`common.data.digits`, fixed seed,
cached under ./assets/digits).  It is then quantized by `vit_quant/main.py` with the paper's ViT settings
(per-channel asymmetric weights with MSE clip search, per-token asymmetric activations, act-order, 10% dampening,
128 calibration images from train/) and evaluated on the 360 held-out val images.

    python vit_quant/quickstart.py            # trains once (a few minutes on 2 CPU cores), then 7 runs
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common.data import digits
from common.io.results import markdown_table, write_json
from common.cli.vit import parse_args
from common.runs.vit import run_cli

PAPER_FLAGS = ["--w_asym", "--w_clip", "--a_asym", "--act_order", "--percdamp", "0.1", "--nsamples", "128"]
METHODS = {"RTN": ["--w_rtn"], "GPTQ": [], "GPTAQ": ["--gptaq"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vit_quant/quickstart.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.path.join("assets", "digits"), help="digits ImageFolder + checkpoint")
    p.add_argument("--output_dir", default=os.path.join("outputs", "vit_quickstart"), help="results go here")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of the digits ViT (if not cached)")
    p.add_argument("--w_bits", type=int, nargs="+", default=[4, 2], help="weight bits to run (A4 throughout)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def ensure_digits_model(root: Path, epochs: int) -> Path:
    """The digits ImageFolder and the trained checkpoint under `root` (made by common.data.digits when absent)."""
    ckpt = root / "vit_digits.safetensors"
    if not ckpt.is_file():
        digits.main(["--out", str(root), "--epochs", str(epochs)])
    return ckpt


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    root = Path(args.assets)
    ckpt = ensure_digits_model(root, args.epochs)
    common = ["--model", digits.MODEL, "--model_kwargs", json.dumps(digits.MODEL_KWARGS), "--checkpoint", str(ckpt),
              "--data_path", str(root), "--workers", "0", "--seed", "0"]
    if args.device:
        common += ["--device", args.device]
    runs = [("FP", 16, 16, [])] + [(label, w, 4, PAPER_FLAGS + ["--w_bits", str(w), "--a_bits", "4"] + flags)
                                   for w in args.w_bits for label, flags in METHODS.items()]
    rows = []
    for label, w_bits, a_bits, flags in runs:
        print(f"\n== {label} W{w_bits}A{a_bits}: vit_quant/main.py {' '.join(flags)}", flush=True)
        out = os.path.join(args.output_dir, f"{label.lower()}_w{w_bits}a{a_bits}")
        r = run_cli(parse_args(common + flags + ["--output_dir", out]))
        rows.append({"method": label, "W": w_bits, "A": a_bits, "top1": r["top1"], "top5": r["top5"]})
    print(f"\ndigits ViT ({digits.MODEL} {digits.MODEL_KWARGS}), full precision and quantized; "
          "top-1 / top-5 (%) on the 360 held-out digits:")
    print(markdown_table(rows, digits=2))
    path = write_json(os.path.join(args.output_dir, "quickstart.json"), {"settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
