"""vit_quant: GPTQ / GPTAQ / RTN post-training quantization of timm vision transformers, ImageNet top-1/top-5.

The flags are common/cli/vit.py's, the pipeline common/runs/vit.py's (see its docstring).

    python vit_quant/main.py --model deit_small_patch16_224 --w_bits 4 --a_bits 4 --w_asym --a_asym --w_clip \
        --act_order --percdamp 0.1 --nsamples 128 --gptaq --data_path /data/imagenet
"""
from __future__ import annotations

from common.cli.exits import run_main
from common.cli.vit import parse_args
from common.runs.vit import run_cli


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
