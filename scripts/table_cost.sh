#!/usr/bin/env bash
# Quantization time and peak memory per model (the GPU-hours column of the GPTAQ paper's Table 2): QuaRot + GPTQ vs
# QuaRot + GPTAQ at W4A4 on each model, perplexity only.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup cost "Usage: scripts/table_cost.sh [--help] [--dry_run]

Each run records time_s.quantize (rotation + capture + solve; the report's quant_s) and peak_memory (CUDA max
allocated over the whole run, or the peak RSS on CPU; the report's peak_gib) in its results.json.  Run it alone on
the machine for meaningful timings.

Environment (defaults in brackets):
  MODEL / MODELS  [meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf meta-llama/Llama-2-70b-hf
                  meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B]
  CAL_DATA        [wikitext2]
  EVAL_DATA       [wikitext2]
  METHODS         [gptq gptaq]
  TASKS           lm-eval tasks [none: perplexity only]" "$@"

gq_words MODEL "${MODELS:-meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf meta-llama/Llama-2-70b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B}"
models=("${GQ_WORDS[@]}")
gq_words METHODS "gptq gptaq"; methods=("${GQ_WORDS[@]}")
gq_llm_data wikitext2 ""
gq_wa_flags 4 4; wa=("${GQ_FLAGS[@]}")

for model in "${models[@]}"; do
  name=$(gq_name "$model")
  for method in "${methods[@]}"; do
    gq_method_flags "$method"
    gq_run "$TABLE_DIR/${name}_w4a4_${method}" "$PYTHON" fake_quant/main.py --model "$model" --rotate "${wa[@]}" \
      "${GQ_FLAGS[@]}" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}"
  done
done
gq_report
