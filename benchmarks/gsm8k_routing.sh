#!/usr/bin/env bash
# GSM8K routing benchmark of issue 2: each tier alone and the routed run on the
# first 100 test questions, from empty stores, with the budget chosen on train.
#
#   bash benchmarks/gsm8k_routing.sh            # ~1 h on 2 cores; resumable: rerun to continue
#   .venv/bin/python benchmarks/gsm8k_table.py  # prints the table from the JSON files
#
# Budget: 0.85 × the mean ATP per request of `always:specialized` on the first
# 30 questions of train.jsonl (the issue's ATP ceiling, measured on training
# questions, never on the test questions it is reported on).
# Runs go two at a time with one llama.cpp thread each (DREAMROUTE_THREADS=1):
# ATP is charged from token counts and the `bench` calibration, so threads
# change wall time only, and one thread per process avoids the stalls of
# spinning threads on a shared 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DR=.venv/bin/dreamroute
DATA=${DATA:-../shared/data/gsm8k}
OUT=benchmarks/results/gsm8k100
N=${N:-100}
export DREAMROUTE_THREADS=${DREAMROUTE_THREADS:-1}
mkdir -p "$OUT"

echo "== budget selection on train.jsonl (30 questions, always:specialized)"
$DR run "$DATA/train.jsonl" --limit 30 --policy always:specialized --db "$OUT/train_specialized.db" \
    --json "$OUT/train_specialized.json"
BUDGET=$(.venv/bin/python -c "import json; r=json.load(open('$OUT/train_specialized.json')); print(round(0.85*r['atp_per_request'], 2))")
echo "$BUDGET" > "$OUT/budget.txt"
echo "chosen budget: $BUDGET J/request"

tier_run() {
  echo "== always:$1 on the first $N test questions"
  $DR run "$DATA/test.jsonl" --limit "$N" --policy "always:$1" --db "$OUT/$1.db" --json "$OUT/always_$1.json"
}
routed_run() {
  echo "== dreamroute, budget $BUDGET J/request"
  $DR run "$DATA/test.jsonl" --limit "$N" --policy dreamroute --budget "$BUDGET" --db "$OUT/dreamroute.db" \
      --json "$OUT/dreamroute.json"
}
tier_run sensory & tier_run tactical & wait
tier_run specialized & routed_run & wait
.venv/bin/python benchmarks/gsm8k_table.py
