#!/usr/bin/env bash
# Replay benchmarks of issue 3: dreamroute and the random router on RouteLLM's
# recorded GSM8K and MMLU outcomes, and the default hierarchy's local_tiers
# recording, with cost-quality curves.
#
#   bash benchmarks/replay.sh [gsm8k|mmlu|local|all]    # writes benchmarks/results/replay/*.json and *.png
#   .venv/bin/python benchmarks/replay_table.py          # prints the table
#
# Every sweep point and seed learns from an empty in-memory store; no router
# setting was tuned on these recordings (defaults of RouterConfig).
set -euo pipefail
cd "$(dirname "$0")/.."
DR=.venv/bin/dreamroute
DATA=${DATA:-../shared/data}
OUT=benchmarks/results/replay
K=${K:-11}
mkdir -p "$OUT"
what=${1:-all}

run() {  # name, recording, args...
  local name=$1 rec=$2; shift 2
  if [ -s "$OUT/$name.json" ]; then echo "have $OUT/$name.json"; return; fi
  echo "== $name"
  $DR simulate "$rec" "$@" --json "$OUT/$name.json.tmp" --plot "$OUT/$name.png" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
}

if [ "$what" = gsm8k ] || [ "$what" = all ]; then
  run gsm8k_random "$DATA/routellm/gsm8k" --policy random --sweep "$K" --shuffle 0 --seeds 10
  run gsm8k_dreamroute_fileorder "$DATA/routellm/gsm8k" --policy dreamroute --sweep "$K"
  run gsm8k_dreamroute_shuffled "$DATA/routellm/gsm8k" --policy dreamroute --sweep "$K" --shuffle 0 --seeds 3
fi
if [ "$what" = local ] || [ "$what" = all ]; then
  run local_dreamroute "$DATA/local_tiers/gsm8k_test_outcomes.jsonl" --policy dreamroute --sweep "$K" --shuffle 0 --seeds 3
  run local_cascade "$DATA/local_tiers/gsm8k_test_outcomes.jsonl" --policy cascade --sweep "$K"
fi
if [ "$what" = mmlu ] || [ "$what" = all ]; then
  run mmlu_dreamroute_fileorder "$DATA/routellm/mmlu" --policy dreamroute --sweep "${K_MMLU:-6}"
  run mmlu_random "$DATA/routellm/mmlu" --policy random --sweep 3 --shuffle 0 --seeds "${SEEDS_MMLU_RANDOM:-10}"
  run mmlu_dreamroute_shuffled "$DATA/routellm/mmlu" --policy dreamroute --sweep "${K_MMLU:-6}" --shuffle 0 --seeds 3
fi
