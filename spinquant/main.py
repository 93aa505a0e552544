"""SpinQuant + GPTQ / GPTAQ: the LLM pipeline with learned rotations instead of random Hadamards.

Norms fused, then the learned R1 (residual stream) and per-layer R2 (value heads) from
`spinquant/optimize_rotation.py` folded into the weights (E R1, W R1, R1^T W, R2^T W_v, W_o R2); R3 (q/k after RoPE)
and R4 (down_proj input) stay online Hadamards.  Everything after the rotation (activation/KV quantizers,
layer-by-layer GPTQ / GPTAQ / RTN, perplexity, lm-eval, results.json, --stream, --resume, torchrun) is
common/runs/llm.py's `run` with fake_quant's flags: the rotation is handed to it as a `common.models.rotation.Rotation`.
A rotation file without R2 (R1 only) gets QuaRot's shared random Hadamard R2 from --rotation_seed.

    python spinquant/main.py --model meta-llama/Llama-2-7b-hf --optimized_rotation_path R.bin --w_bits 4 \
        --a_bits 4 --k_bits 4 --v_bits 4 --gptaq
    torchrun --nproc_per_node 2 spinquant/main.py ...   (same flags; one GPU per process)
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from common.cli.exits import run_main
from common.cli.llm import build_parser as llm_parser
from common.cli.llm import check_args, run_name
from common.models import llm
from common.models.hadamard import random_hadamard_matrix
from common.models.rotation import Rotation
from common.models.rotation_io import RotationSet, load_rotations, model_dims
from common.runs.llm import run_cli

log = logging.getLogger("spinquant")

__all__ = ["build_parser", "parse_args", "learned_rotation", "main"]


def build_parser() -> argparse.ArgumentParser:
    """fake_quant's parser plus --optimized_rotation_path; --rotate is implied and --rotate_mode unused."""
    p = llm_parser("spinquant/main.py")
    p.description = ("SpinQuant: learned R1/R2 rotations (spinquant/optimize_rotation.py) + GPTQ / GPTAQ / RTN "
                     "weight quantization with activation and KV-cache fake quantization; same flags and outputs "
                     "as fake_quant/main.py.")
    for flag in ("--rotate", "--rotate_mode"):
        p._option_string_actions[flag].help = argparse.SUPPRESS
    p._option_string_actions["--rotation_seed"].help = "seed of the random Hadamard R2 when the file has no R2"
    p.add_argument("--optimized_rotation_path", required=True,
                   help="rotation file from spinquant/optimize_rotation.py, or the published SpinQuant R.bin "
                        "(a directory means <dir>/R.bin)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, RotationSet]:
    """Parse, validate (as fake_quant does) and load the rotation file against the model's config.json."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.load_qmodel_path is not None:
        p.error("--load_qmodel_path: evaluate saved models with fake_quant/main.py (the rotation is already in them)")
    args.rotate = True  # before the checks: the rotation flags (--rotation_seed, --fp32_had) are in use
    check_args(p, args)
    args.rotate_mode = "spinquant"
    try:
        rot = load_rotations(os.path.expanduser(args.optimized_rotation_path), llm.read_config(args.model))
    except (ValueError, OSError) as e:
        p.error(f"--optimized_rotation_path: {str(e).splitlines()[0]}")
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", "spinquant", run_name(args).removesuffix("_rot") + "_spin")
    return args, rot


def learned_rotation(rot: RotationSet, config, rotation_seed: int, fp32_had: bool = False) -> Rotation:
    """The learned R1/R2 as the pipeline's rotation; a file without R2 gets QuaRot's random Hadamard R2 drawn
    from rotation_seed + 1."""
    R2 = rot.R2 if rot.R2 is not None else random_hadamard_matrix(model_dims(config)[1], rotation_seed + 1)
    return Rotation(rot.R1, R2, mode="spinquant", seed=None, fp32_had=fp32_had)


def main(argv: list[str] | None = None) -> dict:
    args, rot = parse_args(argv)
    rotation = learned_rotation(rot, llm.read_config(args.model), args.rotation_seed, args.fp32_had)
    record = {"kind": "spinquant", "path": os.path.abspath(os.path.expanduser(args.optimized_rotation_path)),
              "has_r2": rot.R2 is not None, "meta": rot.meta}
    return run_cli(args, rotation, extra={"rotation": record})


if __name__ == "__main__":
    t0 = time.time()
    run_main(main)
    log.info("done in %.1f s", time.time() - t0)
