"""SpinQuant + GPTQ / GPTAQ: the fake_quant pipeline with learned rotations instead of random Hadamards.

Norms fused, then the learned R1 (residual stream) and per-layer R2 (value heads) from
`spinquant/optimize_rotation.py` folded into the weights (E R1, W R1, R1^T W, R2^T W_v, W_o R2); R3 (q/k after RoPE)
and R4 (down_proj input) stay online Hadamards.  Everything after the rotation (activation/KV quantizers,
layer-by-layer GPTQ / GPTAQ / RTN, perplexity, lm-eval, results.json) is `fake_quant/main.py`'s `run`, with all
its flags.  A rotation file without R2 (R1 only) gets QuaRot's shared random Hadamard R2 from --rotation_seed.

    python spinquant/main.py --model meta-llama/Llama-2-7b-hf --optimized_rotation_path R.bin --w_bits 4 \
        --a_bits 4 --k_bits 4 --v_bits 4 --gptaq
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import llm  # noqa: E402
from common.rotation_io import RotationSet, load_rotations, model_dims  # noqa: E402
from fake_quant import args as fq_args  # noqa: E402
from fake_quant import main as fq_main  # noqa: E402

log = logging.getLogger("spinquant")

__all__ = ["build_parser", "parse_args", "learned_rotation", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    """fake_quant's parser plus --optimized_rotation_path; --rotate is implied and --rotate_mode unused."""
    p = fq_args.build_parser()
    p.prog = "spinquant/main.py"
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
    fq_args._check_args(p, args)
    args.rotate = True
    args.rotate_mode = "spinquant"
    try:
        rot = load_rotations(os.path.expanduser(args.optimized_rotation_path), llm.read_config(args.model))
    except (ValueError, OSError) as e:
        p.error(f"--optimized_rotation_path: {str(e).splitlines()[0]}")
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", "spinquant", fq_args.run_name(args).removesuffix("_rot") + "_spin")
    return args, rot


@contextmanager
def learned_rotation(rot: RotationSet, rotation_seed: int) -> Iterator[None]:
    """While active, the pipeline's rotation step (`common.rotation.quarot_rotate`, which fake_quant's `quantize`
    looks up at call time) folds `rot` instead of drawing random Hadamards."""
    from common import rotation
    from common.hadamard import random_hadamard_matrix

    original = rotation.quarot_rotate

    def spinquant_rotate(model, mode: str = "hadamard", seed: int = 0, fp32_had: bool = False,
                         progress: bool = False, online_r4: bool = True) -> None:
        R2 = rot.R2
        if R2 is None:
            R2 = random_hadamard_matrix(model_dims(model.config)[1], rotation_seed + 1)
        rotation.rotate_model(model, rot.R1, R2, online_r4=online_r4, fp32_had=fp32_had, mode="spinquant", seed=None,
                              progress=progress)

    rotation.quarot_rotate = spinquant_rotate
    try:
        yield
    finally:
        rotation.quarot_rotate = original


def run(args: argparse.Namespace, rot: RotationSet) -> dict:
    """fake_quant's run with the learned rotation; results.json gains a "rotation" record."""
    from common.results import write_results

    with learned_rotation(rot, args.rotation_seed):
        result = fq_main.run(args)
    result["rotation"] = {"kind": "spinquant", "path": os.path.abspath(os.path.expanduser(args.optimized_rotation_path)),
                          "has_r2": rot.R2 is not None, "meta": rot.meta}
    write_results(args.output_dir, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args, rot = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from common.solvers import SolverError

    try:
        return run(args, rot)
    except (llm.LLMError, SolverError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    t0 = time.time()
    main()
    log.info("done in %.1f s", time.time() - t0)
