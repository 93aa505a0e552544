#!/usr/bin/env bash
# GPTAQ paper Tables 1 (right) and 2, QuaRot rows: QuaRot + RTN / GPTQ / GPTAQ at W4A4KV4 and W4A4KV16 on Llama-2
# 7B/13B/70B and Llama-3 8B/70B; WikiText-2 perplexity and the zero-shot average (lm-eval).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup quarot_llama "Usage: scripts/table_quarot_llama.sh [--help] [--dry_run]

QuaRot rotation + RTN / GPTQ / GPTAQ, weights per-channel asymmetric with MSE clip, activations per-token
asymmetric clipped at 0.9, KV per-head asymmetric clipped at 0.95; 128 x 2048-token calibration sequences;
WikiText-2 perplexity and lm-eval zero-shot tasks; plus the FP16 model once per model.

Environment (defaults in brackets):
  MODEL / MODELS  one model / a space-separated list [meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf
                  meta-llama/Llama-2-70b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B]
  CAL_DATA        calibration data: dataset name or local file [wikitext2]
  EVAL_DATA       perplexity data [wikitext2]
  W_BITS          weight bits [4]  ('4 2' adds Table 1's W2A4 rows)
  KV_BITS         KV-cache bits [4 16]
  METHODS         [rtn gptq gptaq]
  TASKS           lm-eval tasks [piqa arc_easy arc_challenge hellaswag winogrande boolq]; empty: perplexity only" "$@"

gq_words MODEL "${MODELS:-meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf meta-llama/Llama-2-70b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B}"
models=("${GQ_WORDS[@]}")
gq_words W_BITS "4"; wbits=("${GQ_WORDS[@]}")
gq_words KV_BITS "4 16"; kvbits=("${GQ_WORDS[@]}")
gq_words METHODS "rtn gptq gptaq"; methods=("${GQ_WORDS[@]}")
gq_llm_data wikitext2 "$GQ_PAPER_TASKS"

for model in "${models[@]}"; do
  name=$(gq_name "$model")
  gq_run "$TABLE_DIR/${name}_fp16" "$PYTHON" fake_quant/main.py --model "$model" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}"
  for w in "${wbits[@]}"; do
    gq_wa_flags "$w" 4; wa=("${GQ_FLAGS[@]}")
    for kv in "${kvbits[@]}"; do
      gq_kv_flags "$kv"; kvf=("${GQ_FLAGS[@]}")
      for method in "${methods[@]}"; do
        gq_method_flags "$method"
        gq_run "$TABLE_DIR/${name}_w${w}a4kv${kv}_${method}" "$PYTHON" fake_quant/main.py --model "$model" --rotate \
          "${wa[@]}" "${kvf[@]}" "${GQ_FLAGS[@]}" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}"
      done
    done
  done
done
gq_report
