#!/usr/bin/env bash
# GPTAQ paper Table 1 (left) and Table 4 (EVA-02): DeiT-S, DeiT-B and EVA-02 large at W4A4 and W2A4, GPTQ vs GPTAQ
# (with FP and RTN baselines); ImageNet top-1.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
gq_setup vit "Usage: DATA=/path/to/imagenet scripts/table_vit.sh [--help] [--dry_run]

Per-channel asymmetric weights with MSE clip search, per-token asymmetric activations on every block linear (the
head stays 16-bit), act-order, 10% dampening, 128 calibration images from train/ (paper settings, Sec. 5.2).

Environment (defaults in brackets):
  DATA            ImageNet-style root with train/<class>/ and val/<class>/ (required unless dry-run)
  MODEL / MODELS  timm names [deit_small_patch16_224 deit_base_patch16_224
                  eva02_large_patch14_448.mim_m38m_ft_in22k_in1k]
  CHECKPOINT_DIR  offline weights <CHECKPOINT_DIR>/<model>.safetensors [unset: timm's pretrained weights]
  W_BITS          weight bits [4 2]
  METHODS         [rtn gptq gptaq]
  BSZ             batch size [32]
  VAL_LIMIT       evaluate only this many val images [all]" "$@"

if [[ $DRY_RUN != 1 && -z ${DATA:-} ]]; then
  echo "error: DATA is not set (expected an ImageNet-style root with train/ and val/ class folders)" >&2
  exit 2
fi
data=${DATA:-/path/to/imagenet}
gq_words MODEL "${MODELS:-deit_small_patch16_224 deit_base_patch16_224 eva02_large_patch14_448.mim_m38m_ft_in22k_in1k}"
models=("${GQ_WORDS[@]}")
gq_words W_BITS "4 2"; wbits=("${GQ_WORDS[@]}")
gq_words METHODS "rtn gptq gptaq"; methods=("${GQ_WORDS[@]}")
common=(--data_path "$data" --bsz "${BSZ:-32}")
if [[ -n ${VAL_LIMIT:-} ]]; then common+=(--val_limit "$VAL_LIMIT"); fi

for model in "${models[@]}"; do
  ckpt=()
  if [[ -n ${CHECKPOINT_DIR:-} ]]; then ckpt=(--checkpoint "$CHECKPOINT_DIR/$model.safetensors"); fi
  gq_run "$TABLE_DIR/${model}_fp16" "$PYTHON" vit_quant/main.py --model "$model" "${ckpt[@]}" "${common[@]}"
  for w in "${wbits[@]}"; do
    for method in "${methods[@]}"; do
      gq_method_flags "$method"
      gq_run "$TABLE_DIR/${model}_w${w}a4_${method}" "$PYTHON" vit_quant/main.py --model "$model" "${ckpt[@]}" \
        --w_bits "$w" --w_asym --w_clip --a_bits 4 --a_asym --act_order --percdamp 0.1 --nsamples 128 \
        "${GQ_FLAGS[@]}" "${common[@]}"
    done
  done
done
gq_report
