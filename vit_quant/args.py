"""Command-line flags of vit_quant: GPTQ / GPTAQ / RTN weights + per-token activations on timm ViTs.

W b-bit per output channel (or per group), asymmetric with --w_asym, MSE clip search with --w_clip;
A b-bit per token on the input of every block linear; 16 bits = not quantized (the FP baseline is no flags).
"""
from __future__ import annotations

import argparse
import json

__all__ = ["build_parser", "parse_args", "method_name"]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"img_size\": 32}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit_quant/main.py",
        description="Quantize a timm vision transformer block by block (GPTQ, GPTAQ or RTN weights, per-token "
                    "activations) and report ImageNet-style top-1/top-5.")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", required=True, help="timm model name (deit_*, vit_*, eva02_*)")
    m.add_argument("--model_kwargs", type=_json_dict, default={},
                   help='JSON dict of timm.create_model overrides, e.g. \'{"img_size": 32, "num_classes": 10}\'')
    m.add_argument("--checkpoint", default=None,
                   help="weights file (.safetensors or .pth state dict); default: timm's pretrained weights from the hub")
    m.add_argument("--data_path", required=True, help="ImageNet-style root with train/<class>/ and val/<class>/")
    m.add_argument("--nsamples", type=int, default=128, help="calibration images drawn from train/ (default 128)")
    m.add_argument("--val_limit", type=int, default=None,
                   help="evaluate only the first N val images of a seeded permutation (default: all)")
    m.add_argument("--bsz", type=int, default=32, help="batch size for calibration and evaluation")
    m.add_argument("--workers", type=int, default=4, help="DataLoader worker processes for evaluation")
    m.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the val subset")
    m.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--output_dir", default=None, help="where results.json goes (default: outputs/vit_quant/<run>)")

    w = p.add_argument_group("weights")
    w.add_argument("--w_bits", type=int, default=16, help="weight bits, 2..8 (16 = not quantized)")
    w.add_argument("--w_asym", action="store_true", help="asymmetric weight grid (default symmetric)")
    w.add_argument("--w_clip", action="store_true", help="MSE clip search for the weight grid")
    w.add_argument("--w_groupsize", type=int, default=-1, help="weight group size (-1 = per output channel)")
    w.add_argument("--w_rtn", action="store_true", help="round to nearest instead of GPTQ")
    w.add_argument("--gptaq", action="store_true", help="GPTAQ: fit Q X~ to the full-precision output W X")
    w.add_argument("--alpha", type=float, default=0.25, help="GPTAQ alpha (weight of the asymmetric term)")
    w.add_argument("--gptaq_exact", action="store_true", help="GPTAQ exact variant (GPTQ on V = W + a W dXXT H^-1)")
    w.add_argument("--percdamp", type=float, default=0.01, help="dampening, fraction of mean(diag H) (paper ViT: 0.1)")
    w.add_argument("--act_order", action="store_true", help="quantize columns by descending diag(H)")
    w.add_argument("--static_groups", action="store_true", help="all group grids from the original weights")
    w.add_argument("--order", choices=("forward", "reverse"), default="forward",
                   help="column processing order (reverse = Babai's nearest plane)")

    a = p.add_argument_group("activations")
    a.add_argument("--a_bits", type=int, default=16, help="activation bits, 2..8 (16 = not quantized)")
    a.add_argument("--a_asym", action="store_true", help="asymmetric activation grid (default symmetric)")
    a.add_argument("--a_clip_ratio", type=float, default=1.0, help="activation range clip ratio in (0, 1]")
    a.add_argument("--a_groupsize", type=int, default=-1, help="activation group size (-1 = whole token)")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("w_bits", "a_bits"):
        bits = getattr(args, flag)
        if bits != 16 and not 2 <= bits <= 8:
            p.error(f"--{flag} must be in 2..8 or 16 (not quantized), got {bits}")
    if args.w_rtn and (args.gptaq or args.gptaq_exact):
        p.error("--w_rtn and --gptaq/--gptaq_exact are exclusive")
    if args.gptaq_exact and not args.gptaq:
        p.error("--gptaq_exact needs --gptaq")
    if args.w_bits == 16 and (args.w_rtn or args.gptaq):
        p.error("--w_rtn/--gptaq need --w_bits < 16")
    for flag in ("nsamples", "bsz"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.val_limit is not None and args.val_limit <= 0:
        p.error(f"--val_limit must be positive, got {args.val_limit}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if not 0.0 < args.a_clip_ratio <= 1.0:
        p.error(f"--a_clip_ratio must be in (0, 1], got {args.a_clip_ratio}")
    if args.percdamp < 0:
        p.error(f"--percdamp must be >= 0, got {args.percdamp}")
    for flag in ("w_groupsize", "a_groupsize"):
        if getattr(args, flag) == 0 or getattr(args, flag) < -1:
            p.error(f"--{flag} must be -1 or positive, got {getattr(args, flag)}")


def method_name(args: argparse.Namespace) -> str:
    """'fp16', 'rtn', 'gptq', 'gptaq' or 'gptaq_exact' for weights (activation bits are reported separately)."""
    if args.w_bits == 16:
        return "fp16"
    if args.w_rtn:
        return "rtn"
    if args.gptaq:
        return "gptaq_exact" if args.gptaq_exact else "gptaq"
    return "gptq"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    return args
