#!/usr/bin/env bash
# Replay benchmarks of issue 12 (pacing, exploration, encoder, ANN index): the live router over
# recorded outcomes, every sweep point and seed from an empty in-memory store, 3 seeds, in file
# order and shuffled, with each prompt encoder.
#
#   bash benchmarks/replay12.sh ENCODER [gsm8k|mmlu|local|RUN ...]   # ENCODER: ngram | minilm-int8 | minilm
#   .venv/bin/python benchmarks/replay_table.py --dir benchmarks/results/replay12
#
# Writes benchmarks/results/replay12/<ENCODER>/RUN.json, RUN.png (cost-quality) and RUN_spend.png
# (running ATP per request against the budget, first seed). Runs already written are skipped.
# Router settings are RouterConfig's defaults, chosen on training data (benchmarks/README.md,
# "Issue 12"); the budgets of the *_budget085 / *_budget075 runs are 0.85 / 0.75 × specialized's
# mean ATP on the same recording (--budget-fraction: the issue's setting, not a tuned value; the
# joules depend on this machine's calibration).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
ENC=${1:?encoder: ngram | minilm-int8 | minilm}; shift
export DREAMROUTE_ROUTER__ENCODER=$ENC
DR=.venv/bin/dreamroute
DATA=${DATA:-../shared/data}
OUT=benchmarks/results/replay12/$ENC
K=${K:-11}
LOCAL=$DATA/local_tiers/gsm8k_test_outcomes.jsonl
mkdir -p "$OUT"

args() {
  case $1 in
    local_file)            echo "$LOCAL --policy dreamroute --sweep $K --seeds 3" ;;
    local_shuffled)        echo "$LOCAL --policy dreamroute --sweep $K --shuffle 0 --seeds 3" ;;
    local_budget085_file)  echo "$LOCAL --policy dreamroute --budget-fraction 0.85 --seeds 3" ;;
    local_budget085_shuffled) echo "$LOCAL --policy dreamroute --budget-fraction 0.85 --shuffle 0 --seeds 3" ;;
    local_budget075_file)  echo "$LOCAL --policy dreamroute --budget-fraction 0.75 --seeds 3" ;;
    local_budget075_shuffled) echo "$LOCAL --policy dreamroute --budget-fraction 0.75 --shuffle 0 --seeds 3" ;;
    local_nobudget_file)   echo "$LOCAL --policy dreamroute --seeds 3" ;;
    gsm8k_file)            echo "$DATA/routellm/gsm8k --policy dreamroute --sweep $K --seeds 3" ;;
    gsm8k_shuffled)        echo "$DATA/routellm/gsm8k --policy dreamroute --sweep $K --shuffle 0 --seeds 3" ;;
    mmlu_file)             echo "$DATA/routellm/mmlu --policy dreamroute --sweep ${K_MMLU:-6} --seeds 3" ;;
    mmlu_shuffled)         echo "$DATA/routellm/mmlu --policy dreamroute --sweep ${K_MMLU:-6} --shuffle 0 --seeds 3" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

run() {
  local name=$1
  if [ -s "$OUT/$name.json" ]; then echo "have $OUT/$name.json"; return; fi
  echo "== $ENC $name: dreamroute simulate $(args "$name")  ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
  # shellcheck disable=SC2046
  $DR simulate $(args "$name") --json "$OUT/$name.json.tmp" --plot "$OUT/$name.png" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
}

[ $# -gt 0 ] || set -- local gsm8k mmlu
for what in "$@"; do
  case $what in
    local) for r in local_file local_shuffled local_budget085_file local_budget085_shuffled local_budget075_file \
                    local_budget075_shuffled local_nobudget_file; do run $r; done ;;
    gsm8k) for r in gsm8k_file gsm8k_shuffled; do run $r; done ;;
    mmlu)  for r in mmlu_file mmlu_shuffled; do run $r; done ;;
    *)     run "$what" ;;
  esac
done
