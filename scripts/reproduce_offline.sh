#!/usr/bin/env bash
# Offline reproduction on a real model: SmolLM2-135M-Instruct calibrated on CPython documentation text
# (assets/pydoc/cal.txt) and evaluated on held-out documentation pages (assets/pydoc/eval.txt).
# FP, RTN, GPTQ, GPTAQ and GPTAQ-exact at W4A4 (rotated), W4A4KV4 (rotated), W4A8 (rotated), and weight-only
# W3 / W2 with group size 64; perplexity and per-layer proxy losses, then the aggregated report.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
quick=0
args=()
for a in "$@"; do
  if [[ $a == --quick ]]; then quick=1; else args+=("$a"); fi
done
gq_setup "offline_$([[ $quick == 1 ]] && echo quick || echo full)" "Usage: scripts/reproduce_offline.sh [--quick] [--help] [--dry_run]

Needs the assets of scripts/get_assets.sh: assets/smollm2-135m (SmolLM2-135M-Instruct; its weights come from a
Q4_1 GGUF, see common/data/assets.py) and assets/pydoc/{cal,eval}.txt.  Calibration reads only cal.txt, perplexity
only eval.txt.  Methods: fp16 (once), rtn, gptq, gptaq, gptaq_exact; settings:
  w4a4_rot     QuaRot, W4 per-channel asym + MSE clip (full mode), A4 per-token asym clipped at 0.9
  w4a4kv4_rot  the same plus K/V 4-bit per-head asym clipped at 0.95
  w4a8_rot     QuaRot, W4, A8
  w3g64, w2g64 weight-only, group size 64 (SmolLM2's hidden size 576 is not a multiple of 128), asym (+ clip),
               act-order, no rotation

Modes:
  full (default)  the paper's calibration size, 128 x 2048 tokens, the whole eval.txt in 2048-token windows,
                  float16 on DEVICE [cuda]
  --quick         for 2 CPU cores: float32 on DEVICE [cpu], 8 x 128 calibration tokens drawn from the first 20,000
                  lines of cal.txt (0.8 MB), perplexity on the first 200 lines of eval.txt (17 windows of 128
                  tokens), no MSE clip search, QUICK_JOBS [2] runs at a time with OMP_NUM_THREADS [1]

Environment (defaults in brackets): ASSETS [assets], DEVICE (see above), METHODS [rtn gptq gptaq gptaq_exact],
SETTINGS [full: w4a4_rot w4a4kv4_rot w4a8_rot w3g64 w2g64; --quick: w4a4_rot w4a4kv4_rot w3g64]" "${args[@]}"

assets=${ASSETS:-assets}
model=$assets/smollm2-135m
cal=$assets/pydoc/cal.txt
eval_txt=$assets/pydoc/eval.txt
if [[ $DRY_RUN != 1 ]]; then
  for f in "$model/config.json" "$cal" "$eval_txt"; do
    [[ -f $f ]] || { echo "error: $f is missing; fetch the assets with scripts/get_assets.sh" >&2; exit 2; }
  done
fi
gq_words METHODS "rtn gptq gptaq gptaq_exact"; methods=("${GQ_WORDS[@]}")
# the quick mode leaves out W4A8 and W2 g64 by default (W2 needs more than its 1,024 calibration tokens; see
# docs/RESULTS.md), which keeps it under 10 minutes on 2 cores; SETTINGS brings them back
all_settings="w4a4_rot w4a4kv4_rot w4a8_rot w3g64 w2g64"
gq_words SETTINGS "$([[ $quick == 1 ]] && echo "w4a4_rot w4a4kv4_rot w3g64" || echo "$all_settings")"
settings=("${GQ_WORDS[@]}")

if [[ $quick == 1 ]]; then
  # prefixes of the two files (whole lines, so that no UTF-8 character is cut): a smaller calibration pool to
  # tokenize and fewer evaluation windows; no MSE clip search; two single-threaded runs at a time
  cal_used=$TABLE_DIR/cal_head20k.txt
  eval_used=$TABLE_DIR/eval_head200.txt
  echo "mkdir -p $TABLE_DIR"
  echo "head -n 20000 $cal > $cal_used"
  echo "head -n 200 $eval_txt > $eval_used"
  if [[ $DRY_RUN != 1 ]]; then
    mkdir -p "$TABLE_DIR"
    head -n 20000 "$cal" > "$cal_used.tmp" && mv "$cal_used.tmp" "$cal_used"
    head -n 200 "$eval_txt" > "$eval_used.tmp" && mv "$eval_used.tmp" "$eval_used"
  fi
  run=(--dtype float32 --device "${DEVICE:-cpu}" --nsamples 8 --seqlen 128 --bsz 8)
  GQ_W_CLIP=0
  JOBS=${QUICK_JOBS:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  cal_used=$cal eval_used=$eval_txt
  run=(--dtype float16 --device "${DEVICE:-cuda}" --nsamples 128 --seqlen 2048 --bsz 8 --fp32_had)
fi
run=(--model "$model" "${run[@]}" --cal_dataset "$cal_used" --eval_dataset "$eval_used")

gq_run "$TABLE_DIR/fp16" "$PYTHON" fake_quant/main.py "${run[@]}"
for setting in "${settings[@]}"; do
  case $setting in
    w4a4_rot) gq_wa_flags 4 4; flags=(--rotate "${GQ_FLAGS[@]}") ;;
    w4a4kv4_rot) gq_wa_flags 4 4; flags=(--rotate "${GQ_FLAGS[@]}"); gq_kv_flags 4; flags+=("${GQ_FLAGS[@]}") ;;
    w4a8_rot) gq_wa_flags 4 8; flags=(--rotate "${GQ_FLAGS[@]}") ;;
    w3g64|w2g64) gq_wa_flags "${setting:1:1}" 16; flags=("${GQ_FLAGS[@]}" --w_groupsize 64 --act_order) ;;
    *) echo "error: unknown setting '$setting' (expected w4a4_rot, w4a4kv4_rot, w4a8_rot, w3g64 or w2g64)" >&2
       exit 2 ;;
  esac
  for method in "${methods[@]}"; do
    gq_method_flags "$method"
    gq_run "$TABLE_DIR/${setting}_${method}" "$PYTHON" fake_quant/main.py "${run[@]}" "${flags[@]}" "${GQ_FLAGS[@]}"
  done
done
gq_report --no_paper
