"""fake_quant: QuaRot + GPTQ / GPTAQ / RTN with W/A/KV fake quantization of decoder LLMs; perplexity and lm-eval.

The flags are common/cli/llm.py's, the pipeline common/runs/llm.py's (see its docstring).

    python fake_quant/main.py --model meta-llama/Llama-2-7b-hf --rotate --w_bits 4 --a_bits 4 --k_bits 4 \
        --v_bits 4 --w_clip --a_clip_ratio 0.9 --k_clip_ratio 0.95 --v_clip_ratio 0.95 --gptaq
    torchrun --nproc_per_node 2 fake_quant/main.py ...   (same flags; one GPU per process)
"""
from __future__ import annotations

import logging
import time

from common.cli.exits import run_main
from common.cli.llm import parse_args
from common.runs.llm import run_cli

log = logging.getLogger("fake_quant")


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


if __name__ == "__main__":
    t0 = time.time()
    run_main(main)
    log.info("done in %.1f s", time.time() - t0)
