#!/usr/bin/env bash
# The demo alone and beside one busy process (a pure-Python spin loop on one core), wall time both ways.
# Threads follow the free cores (src/dreamroute/backends/threads.py); the third run pins 2 threads
# beside the same neighbour (DREAMROUTE_THREADS=2, the old default) on the first 10 problems, for scale.
#   bash benchmarks/demo_neighbour.sh            -> benchmarks/results/demo_neighbour.json (+ .txt logs)
# Run it on an otherwise idle machine: it is the neighbour's only company.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
DR=.venv/bin/dreamroute
run() {  # name, n, extra env...
    local name=$1 n=$2; shift 2
    local t0 t1
    t0=$(date +%s.%N)
    env "$@" "$DR" demo --n "$n" --json "$OUT/demo_$name.json" > "$OUT/demo_$name.txt" 2>&1
    t1=$(date +%s.%N)
    python3 -c "print(round($t1 - $t0, 1))"
}
spin() { python3 -c 'while True: pass' & echo $!; }
alone=$(run alone 40 TZ=UTC)
pid=$(spin); busy=$(run neighbour 40 TZ=UTC); kill "$pid"
pid=$(spin); adaptive10=$(run neighbour10 10 TZ=UTC); kill "$pid"
pid=$(spin); pinned10=$(run neighbour_pinned2 10 DREAMROUTE_THREADS=2); kill "$pid"
cat > "$OUT/demo_neighbour.json" <<JSON
{"command": "bash benchmarks/demo_neighbour.sh", "cores": $(nproc),
 "demo_40_alone_s": $alone, "demo_40_beside_busy_s": $busy,
 "demo_10_beside_busy_adaptive_s": $adaptive10, "demo_10_beside_busy_pinned_2_threads_s": $pinned10}
JSON
cat "$OUT/demo_neighbour.json"
