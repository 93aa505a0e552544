# Shared helpers of the per-table scripts (sourced by them, not run): argument handling, the run loop with
# dry-run / resume, the paper's quantization flag sets, and the final report.
#
# Environment read by every script:
#   OUT         results root (default outputs); a script writes its runs under $OUT/<table>/
#   DRY_RUN=1   print the commands without running them (same as the --dry_run argument)
#   FORCE=1     re-run runs whose results.json exists (default: skip them, so a stopped table resumes)
#   PYTHON      interpreter (default python)
#   EXTRA_ARGS  appended to every main.py call, e.g. "--device cuda:0 --offload_inputs"
#   JOBS        runs at once (default 1); with JOBS > 1 each run's output goes to <run dir>/log.txt

# gq_setup TABLE USAGE "$@": parse --help / --dry_run, cd to the repository, set OUT, TABLE_DIR, GQ_EXTRA.
gq_setup() {
  TABLE=$1 GQ_USAGE=$2
  shift 2
  local arg
  for arg in "$@"; do
    case $arg in
      -h|--help) printf '%s\n\n%s\n' "$GQ_USAGE" "$GQ_COMMON_HELP"; exit 0 ;;
      --dry_run|--dry-run) DRY_RUN=1 ;;
      *) echo "error: unknown argument '$arg' (expected --help or --dry_run; settings come from the environment)" >&2
         exit 2 ;;
    esac
  done
  if [[ -n ${OUT:-} && $OUT != /* ]]; then OUT=$PWD/$OUT; fi  # a relative OUT is the caller's
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
  PYTHON=${PYTHON:-python}
  DRY_RUN=${DRY_RUN:-0}
  OUT=${OUT:-outputs}
  TABLE_DIR=$OUT/$TABLE
  read -r -a GQ_EXTRA <<< "${EXTRA_ARGS:-}"
  GQ_DONE=0 GQ_SKIPPED=0 GQ_PIDS=() GQ_DIRS=()
  JOBS=${JOBS:-1}
  [[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "error: JOBS must be a positive integer, got '$JOBS'" >&2; exit 2; }
}

GQ_COMMON_HELP="Common environment: OUT (results root, default outputs; runs go to \$OUT/<table>/), DRY_RUN=1 or
--dry_run (print the commands only), FORCE=1 (re-run finished runs; default skips a run whose results.json exists),
PYTHON (default python), EXTRA_ARGS (appended to every main.py call, e.g. '--device cuda:0 --offload_inputs'),
JOBS (runs at once, default 1; each parallel run logs to <run dir>/log.txt).
The commands run in the repository root: relative model / data paths are taken from there.
The last step is: python -m common.io.report \$OUT/<table> --paper scripts/paper_numbers.json"

# gq_words VAR DEFAULT: split the environment variable VAR (or DEFAULT) on spaces into the array GQ_WORDS.
gq_words() {
  read -r -a GQ_WORDS <<< "${!1:-$2}"
}

# gq_name MODEL: the run-name stem of a hub id or local directory (its last path component).
gq_name() {
  local m=${1%/}
  printf '%s' "${m##*/}"
}

# gq_print CMD...: the command, shell-quoted on one line.
gq_print() {
  local q
  printf -v q '%q ' "$@"
  echo "${q% }"
}

# gq_run [--no_extra] DIR CMD...: run CMD with --output_dir DIR (and EXTRA_ARGS unless --no_extra); print it first;
# skip it when DIR/results.json exists and is not a failed run's (unless FORCE=1); only print it with DRY_RUN=1.  A failing run stops the script
# (with JOBS > 1: the runs under way finish first, see gq_wait).
gq_run() {
  local extra=("${GQ_EXTRA[@]}")
  if [[ $1 == --no_extra ]]; then extra=(); shift; fi
  local dir=$1
  shift
  local cmd=("$@" --output_dir "$dir" "${extra[@]}")
  if [[ $DRY_RUN != 1 && ${FORCE:-0} != 1 && -f $dir/results.json ]] && ! grep -q '"status": "failed"' "$dir/results.json"; then
    echo "# already done: $dir/results.json"
    GQ_SKIPPED=$((GQ_SKIPPED + 1))
    return 0
  fi
  gq_print "${cmd[@]}"
  GQ_DONE=$((GQ_DONE + 1))
  [[ $DRY_RUN == 1 ]] && return 0
  if (( JOBS == 1 )); then
    "${cmd[@]}" || { echo "error: run failed (exit $?): $dir" >&2; exit 1; }
    return 0
  fi
  while (( $(jobs -rp | wc -l) >= JOBS )); do sleep 1; done
  mkdir -p "$dir"
  "${cmd[@]}" > "$dir/log.txt" 2>&1 &
  GQ_PIDS+=($!) GQ_DIRS+=("$dir")
}

# gq_wait: wait for the runs started in the background (JOBS > 1); exit 1 naming the failed ones.
gq_wait() {
  local i failed=0
  for i in "${!GQ_PIDS[@]}"; do
    if ! wait "${GQ_PIDS[$i]}"; then
      echo "error: run failed: ${GQ_DIRS[$i]} (log: ${GQ_DIRS[$i]}/log.txt)" >&2
      failed=1
    fi
  done
  GQ_PIDS=() GQ_DIRS=()
  (( failed == 0 )) || exit 1
}

# gq_method_flags METHOD: the weight-solver flags of fp16 | rtn | gptq | gptaq | gptaq_exact into GQ_FLAGS.
gq_method_flags() {
  case $1 in
    fp16|gptq) GQ_FLAGS=() ;;
    rtn) GQ_FLAGS=(--w_rtn) ;;
    gptaq) GQ_FLAGS=(--gptaq) ;;
    gptaq_exact) GQ_FLAGS=(--gptaq --gptaq_exact) ;;
    gptaq_p_only) GQ_FLAGS=(--gptaq --gptaq_p_only) ;;
    *) echo "error: unknown method '$1' (expected fp16, rtn, gptq, gptaq, gptaq_exact or gptaq_p_only)" >&2; exit 2 ;;
  esac
}

# The paper's W/A setting (Sec. 5.1): per-channel asymmetric weights with MSE clip search, per-token asymmetric
# activations clipped at 0.9 (QuaRot); gq_wa_flags W A fills GQ_FLAGS (A=16: weight-only; GQ_W_CLIP=0: no clip search).
gq_wa_flags() {
  GQ_FLAGS=(--w_bits "$1" --w_asym)
  if [[ ${GQ_W_CLIP:-1} == 1 ]]; then GQ_FLAGS+=(--w_clip); fi
  if (( $2 < 16 )); then GQ_FLAGS+=(--a_bits "$2" --a_asym --a_clip_ratio 0.9); fi
}

# gq_kv_flags KV: asymmetric per-head KV-cache quantization with clip ratio 0.95 (QuaRot's setting); 16 = none.
gq_kv_flags() {
  if (( $1 < 16 )); then
    GQ_FLAGS=(--k_bits "$1" --v_bits "$1" --k_asym --v_asym --k_clip_ratio 0.95 --v_clip_ratio 0.95)
  else
    GQ_FLAGS=()
  fi
}

# The zero-shot tasks of the paper's Table 2.
GQ_PAPER_TASKS="piqa arc_easy arc_challenge hellaswag winogrande boolq"

# gq_llm_data CAL_DEFAULT TASKS_DEFAULT: GQ_DATA (--cal_dataset CAL_DATA, --eval_dataset EVAL_DATA [wikitext2]) and
# GQ_LM_EVAL (--lm_eval --tasks TASKS; TASKS set but empty: none).
gq_llm_data() {
  GQ_DATA=(--cal_dataset "${CAL_DATA:-$1}" --eval_dataset "${EVAL_DATA:-wikitext2}")
  local tasks
  read -r -a tasks <<< "${TASKS-$2}"
  GQ_LM_EVAL=()
  if (( ${#tasks[@]} )); then GQ_LM_EVAL=(--lm_eval --tasks "${tasks[@]}"); fi
}

# gq_report [--no_paper]: aggregate $TABLE_DIR (markdown, CSV, plots) with the paper's numbers beside ours.
gq_report() {
  gq_wait
  echo "# $GQ_DONE run(s) $( [[ $DRY_RUN == 1 ]] && echo 'printed' || echo 'run'), $GQ_SKIPPED already done"
  local cmd=("$PYTHON" -m common.io.report "$TABLE_DIR")
  if [[ ${1:-} != --no_paper ]]; then cmd+=(--paper scripts/paper_numbers.json); fi
  gq_print "${cmd[@]}"
  [[ $DRY_RUN == 1 ]] && return 0
  "${cmd[@]}"
}
