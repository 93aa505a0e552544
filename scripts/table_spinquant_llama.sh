#!/usr/bin/env bash
# GPTAQ paper Table 2, SpinQuant rows: learned R1/R2 rotations (Cayley SGD) + GPTQ / GPTAQ at W4A4KV4 and W4A4KV16
# on Llama-2 7B/13B/70B and Llama-3 8B/70B; WikiText-2 perplexity and the zero-shot average.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup spinquant_llama "Usage: scripts/table_spinquant_llama.sh [--help] [--dry_run]

Per model and KV setting: learn the rotations with spinquant/optimize_rotation.py at W16A4KV<kv> (16-bit weights,
as the GPTAQ authors did before GPTQ/GPTAQ; paper defaults: 800 x 2048 WikiText-2 samples, 100 Cayley SGD steps,
lr 1.5) unless ROTATION_DIR holds them, then quantize with spinquant/main.py (weights per-channel asymmetric with
MSE clip, activations per-token asymmetric clipped at 0.9, KV per-head asymmetric clipped at 0.95).

Environment (defaults in brackets):
  MODEL / MODELS  one model / a space-separated list [meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf
                  meta-llama/Llama-2-70b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B]
  ROTATION_DIR    existing rotation files <ROTATION_DIR>/<model name>_w16a4kv<kv>.bin (e.g. the published
                  SpinQuant R.bin files, renamed) [unset: learn them into \$OUT/spinquant_llama/rotations/]
  ROT_ARGS        extra arguments of optimize_rotation.py, e.g. '--bsz 8 --micro_bsz 1 --grad_checkpointing'
  CAL_DATA        calibration / rotation-training data [wikitext2]
  EVAL_DATA       perplexity data [wikitext2]
  KV_BITS         KV-cache bits [4 16]
  METHODS         [gptq gptaq]
  TASKS           lm-eval tasks [piqa arc_easy arc_challenge hellaswag winogrande boolq]; empty: perplexity only" "$@"

gq_words MODEL "${MODELS:-meta-llama/Llama-2-7b-hf meta-llama/Llama-2-13b-hf meta-llama/Llama-2-70b-hf meta-llama/Meta-Llama-3-8B meta-llama/Meta-Llama-3-70B}"
models=("${GQ_WORDS[@]}")
gq_words KV_BITS "4 16"; kvbits=("${GQ_WORDS[@]}")
gq_words METHODS "gptq gptaq"; methods=("${GQ_WORDS[@]}")
read -r -a rot_args <<< "${ROT_ARGS:-}"
gq_llm_data wikitext2 "$GQ_PAPER_TASKS"

for model in "${models[@]}"; do
  name=$(gq_name "$model")
  for kv in "${kvbits[@]}"; do
    gq_kv_flags "$kv"; kvf=("${GQ_FLAGS[@]}")
    if [[ -n ${ROTATION_DIR:-} ]]; then
      rot=$ROTATION_DIR/${name}_w16a4kv${kv}.bin
    else
      rot=$TABLE_DIR/rotations/${name}_w16a4kv${kv}.bin
      gq_run --no_extra "$TABLE_DIR/rotations/${name}_w16a4kv${kv}" "$PYTHON" spinquant/optimize_rotation.py \
        --model "$model" --w_bits 16 --a_bits 4 --a_asym --a_clip_ratio 0.9 "${kvf[@]}" --cal_dataset "${CAL_DATA:-wikitext2}" \
        --output_rotation_path "$rot" "${rot_args[@]}"
      gq_wait  # (JOBS > 1) the runs below read this rotation
    fi
    gq_wa_flags 4 4; wa=("${GQ_FLAGS[@]}")
    for method in "${methods[@]}"; do
      gq_method_flags "$method"
      gq_run "$TABLE_DIR/${name}_w4a4kv${kv}_${method}" "$PYTHON" spinquant/main.py --model "$model" \
        --optimized_rotation_path "$rot" "${wa[@]}" "${kvf[@]}" "${GQ_FLAGS[@]}" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}"
    done
  done
done
gq_report
