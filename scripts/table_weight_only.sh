#!/usr/bin/env bash
# Weight-only GPTQ vs GPTAQ: the GPTQv2 README table (Llama-3.1-8B-Instruct, W4 g128 and W3 g128, ARC-Challenge and
# GSM8K through lm-eval) and, with other MODELS / TASKS, the paper's Table 3 (W3 g128, symmetric, act-order).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup weight_only "Usage: scripts/table_weight_only.sh [--help] [--dry_run]

Symmetric per-group weights (group 128) with act-order, 16-bit activations and KV cache, no rotation, calibrated on
128 x 2048-token C4 windows; WikiText-2 perplexity and lm-eval tasks; plus the FP16 model once per model.
With C4_PPL=1 each quantized model is also saved and re-evaluated on C4 perplexity (a second run folder, _c4).
The paper's Table 3: MODELS='meta-llama/Meta-Llama-3-8B-Instruct meta-llama/Llama-2-7b-hf
meta-llama/Llama-2-13b-hf' W_BITS=3 C4_PPL=1 TASKS='piqa arc_easy arc_challenge hellaswag winogrande boolq
openbookqa social_iqa'.
GSM8K as in the GPTQv2 README: each quantized model is saved and re-evaluated with GSM8K_TASK, 8-shot, prompts in
the model's chat template with the examples as turns (a second run folder, _gsm8k; score: exact_match, strict-match
filter, also recorded: flexible-extract).

Environment (defaults in brackets):
  MODEL / MODELS  one model / a space-separated list [meta-llama/Llama-3.1-8B-Instruct]
  CAL_DATA        calibration data [c4]
  EVAL_DATA       perplexity data [wikitext2]
  W_BITS          weight bits [4 3]
  GROUPSIZE       weight group size [128]
  METHODS         [rtn gptq gptaq]
  TASKS           lm-eval tasks [arc_challenge]; empty: perplexity only
  C4_PPL=1        also evaluate C4 perplexity (saves each quantized model under the run folder)
  GSM8K_TASK      lm-eval generation task [gsm8k_platinum_cot]; empty: none (saves each quantized model too)" "$@"

gq_words MODEL "${MODELS:-meta-llama/Llama-3.1-8B-Instruct}"; models=("${GQ_WORDS[@]}")
gq_words W_BITS "4 3"; wbits=("${GQ_WORDS[@]}")
gq_words METHODS "rtn gptq gptaq"; methods=("${GQ_WORDS[@]}")
g=${GROUPSIZE:-128}
gq_llm_data c4 arc_challenge
gsm8k=${GSM8K_TASK-gsm8k_platinum_cot}
gsm8k_flags=(--lm_eval --tasks "$gsm8k" --lm_eval_num_fewshot 8 --lm_eval_chat_template)

for model in "${models[@]}"; do
  name=$(gq_name "$model")
  gq_run "$TABLE_DIR/${name}_fp16" "$PYTHON" fake_quant/main.py --model "$model" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}"
  if [[ ${C4_PPL:-0} == 1 ]]; then
    gq_run "$TABLE_DIR/${name}_fp16_c4" "$PYTHON" fake_quant/main.py --model "$model" --eval_dataset c4
  fi
  if [[ -n $gsm8k ]]; then
    gq_run "$TABLE_DIR/${name}_fp16_gsm8k" "$PYTHON" fake_quant/main.py --model "$model" "${gsm8k_flags[@]}"
  fi
  for w in "${wbits[@]}"; do
    for method in "${methods[@]}"; do
      gq_method_flags "$method"
      run=$TABLE_DIR/${name}_w${w}g${g}_${method}
      save=()
      if [[ ${C4_PPL:-0} == 1 || -n $gsm8k ]]; then save=(--save_qmodel_path "$run/qmodel"); fi
      gq_run "$run" "$PYTHON" fake_quant/main.py --model "$model" --w_bits "$w" --w_groupsize "$g" --act_order \
        "${GQ_FLAGS[@]}" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}" "${save[@]}"
      if [[ ${C4_PPL:-0} == 1 || -n $gsm8k ]]; then gq_wait; fi  # (JOBS > 1) the saved model must exist
      if [[ ${C4_PPL:-0} == 1 ]]; then
        gq_run "${run}_c4" "$PYTHON" fake_quant/main.py --load_qmodel_path "$run/qmodel" --eval_dataset c4
      fi
      if [[ -n $gsm8k ]]; then
        gq_run "${run}_gsm8k" "$PYTHON" fake_quant/main.py --load_qmodel_path "$run/qmodel" "${gsm8k_flags[@]}"
      fi
    done
  done
done
gq_report
