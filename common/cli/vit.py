"""Command line of vit_quant/main.py: GPTQ / GPTAQ / RTN weights + per-token activations on timm ViTs.

W b-bit per output channel (or per group), asymmetric with --w_asym, MSE clip search with --w_clip;
A b-bit per token on the input of every block linear; 16 bits = not quantized (the FP baseline is no flags).
"""
from __future__ import annotations

import argparse

from common.cli import flags, types
from common.solver import SolverConfig

__all__ = ["build_parser", "parse_args", "method_name", "settings"]


def build_parser() -> argparse.ArgumentParser:
    p = types.OneLineParser(
        prog="vit_quant/main.py",
        description="Quantize a timm vision transformer block by block (GPTQ, GPTAQ or RTN weights, per-token "
                    "activations) and report ImageNet-style top-1/top-5.")
    m = p.add_argument_group("model and data")
    m.add_argument("--model", required=True, help="timm model name (deit_*, vit_*, eva02_*)")
    m.add_argument("--model_kwargs", type=types.json_dict, default={},
                   help='JSON dict of timm.create_model overrides, e.g. \'{"img_size": 32, "num_classes": 10}\'')
    m.add_argument("--checkpoint", default=None,
                   help="weights file (.safetensors or .pth state dict); default: timm's pretrained weights from the hub")
    m.add_argument("--data_path", required=True, help="ImageNet-style root with train/<class>/ and val/<class>/")
    m.add_argument("--nsamples", type=types.positive, default=128,
                   help="calibration images drawn from train/ (default 128)")
    m.add_argument("--val_limit", type=types.positive, default=None,
                   help="evaluate only the first N val images of a seeded permutation (default: all)")
    m.add_argument("--bsz", type=types.positive, default=32, help="batch size for calibration and evaluation")
    m.add_argument("--workers", type=types.nonneg_int, default=4, help="DataLoader worker processes for evaluation")
    m.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and the val subset")
    m.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    m.add_argument("--cuda_graphs", action="store_true",
                   help="on CUDA, capture each block group's per-batch passes once as CUDA graphs and replay them on "
                        "the other batches (the same results, checked bit for bit)")
    m.add_argument("--output_dir", default=None, help="where results.json goes (default: outputs/vit_quant/<run>)")

    flags.add_weight_flags(p)
    flags.add_act_flags(p)
    return p


def method_name(args: argparse.Namespace) -> str:
    """'fp16' (weights not quantized), 'rtn', 'gptq', 'gptaq', 'gptaq_exact' or 'gptaq_p_term_only'."""
    label = flags.solver_config(args).label
    return "fp16" if label == "none" else label


def settings(args: argparse.Namespace) -> SolverConfig:
    return flags.solver_config(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    flags.check_weight_flags(p, args)
    flags.check_act_flags(p, args)
    return args
