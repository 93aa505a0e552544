#!/usr/bin/env bash
# Ablations of GPTQ / GPTAQ on one model (QuaRot, W4A4, paper's Tables 5/6 model Llama-3 8B): GPTAQ's alpha,
# dampening, act-order, calibration size, the exact GPTAQ variant against the published P form, forward against
# reverse (Babai) column order, the update terms (paper Table 5) and the quantization order (paper Table 6).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup ablations "Usage: scripts/table_ablations.sh [--help] [--dry_run]

Base setting: QuaRot rotation, W4A4 (KV16), weights per-channel asymmetric with MSE clip, activations per-token
asymmetric clipped at 0.9, 128 x 2048 calibration sequences, dampening 0.01, alpha 0.25.  One sub-folder per
ablation under \$OUT/ablations/.

Environment (defaults in brackets):
  MODEL           [meta-llama/Meta-Llama-3-8B]
  CAL_DATA        [wikitext2]
  EVAL_DATA       [wikitext2]
  ABLATIONS       which ones [alpha damp act_order nsamples exact order terms quant_order]
                  terms: RTN, GPTQ (error feedback only), GPTAQ with the P term only, GPTAQ (both) - Table 5
                  quant_order: GPTQ and GPTAQ with activation quantizers off (W->A) / on (A->W) while
                  calibrating - Table 6 (its Llama-2 7B rows: MODEL=meta-llama/Llama-2-7b-hf)
  ALPHAS          GPTAQ alpha values [0 0.125 0.25 0.5 1]
  DAMPS           dampening (fraction of mean diag H) [0.001 0.01 0.1]
  NSAMPLES_LIST   calibration sequences [32 64 128 256]
  TASKS           lm-eval tasks [none: perplexity only]" "$@"

model=${MODEL:-meta-llama/Meta-Llama-3-8B}
name=$(gq_name "$model")
gq_words ABLATIONS "alpha damp act_order nsamples exact order terms quant_order"; ablations=("${GQ_WORDS[@]}")
gq_words ALPHAS "0 0.125 0.25 0.5 1"; alphas=("${GQ_WORDS[@]}")
gq_words DAMPS "0.001 0.01 0.1"; damps=("${GQ_WORDS[@]}")
gq_words NSAMPLES_LIST "32 64 128 256"; nsamples=("${GQ_WORDS[@]}")
gq_llm_data wikitext2 ""
gq_wa_flags 4 4
base=(--model "$model" --rotate "${GQ_FLAGS[@]}" "${GQ_DATA[@]}" "${GQ_LM_EVAL[@]}")

# ablate SUBDIR TAG METHOD [FLAGS...]: one run of the base setting
ablate() {
  local sub=$1 tag=$2 method=$3
  shift 3
  gq_method_flags "$method"
  gq_run "$TABLE_DIR/$sub/${name}_${tag}" "$PYTHON" fake_quant/main.py "${base[@]}" "${GQ_FLAGS[@]}" "$@"
}

for ab in "${ablations[@]}"; do
  case $ab in
    alpha)
      ablate alpha gptq gptq
      for a in "${alphas[@]}"; do ablate alpha "gptaq_alpha$a" gptaq --alpha "$a"; done ;;
    damp)
      for d in "${damps[@]}"; do for m in gptq gptaq; do ablate damp "${m}_damp$d" "$m" --percdamp "$d"; done; done ;;
    act_order)
      for m in gptq gptaq; do ablate act_order "$m" "$m"; ablate act_order "${m}_act_order" "$m" --act_order; done ;;
    nsamples)
      for n in "${nsamples[@]}"; do for m in gptq gptaq; do ablate nsamples "${m}_n$n" "$m" --nsamples "$n"; done; done ;;
    exact)
      for m in gptq gptaq gptaq_exact; do ablate exact "$m" "$m"; done ;;
    order)
      for o in forward reverse; do for m in gptq gptaq; do ablate order "${m}_$o" "$m" --order "$o"; done; done ;;
    terms)
      for m in rtn gptq gptaq_p_only gptaq; do ablate terms "$m" "$m"; done ;;
    quant_order)
      for o in w_first a_first; do for m in gptq gptaq; do ablate quant_order "${m}_$o" "$m" --quant_order "$o"; done; done ;;
    *) echo "error: unknown ablation '$ab' (expected alpha, damp, act_order, nsamples, exact, order, terms or" \
            "quant_order)" >&2; exit 2 ;;
  esac
done
gq_report
