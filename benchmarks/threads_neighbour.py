"""llama.cpp threads beside a busy neighbour: threads that follow the free cores vs 2 pinned threads.

    .venv/bin/python benchmarks/threads_neighbour.py --tier tactical --reps 4 \
        --json benchmarks/results/threads_neighbour.json

One process holds the tier twice: once without ``n_threads`` (each call uses one thread per core
other processes leave free, backends/threads.py) and once pinned to 2 threads (the old default on
2 cores). With a busy neighbour (a pure-Python spin loop, one core) running, the two answer the
same prompt in alternation, ``--reps`` times each, KV cache emptied before every call; then the
same without the neighbour. Per mode: wall seconds per call (prefill + 48 greedy tokens), median.
The ratio pinned / adaptive beside the neighbour is what the thread share buys; the machine's
other load (uptime) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from dreamroute.backends.llama import LlamaBackend
from dreamroute.config import default_tiers, load_settings
from dreamroute.backends.registry import resolve_model

PROMPT = [{"role": "user", "content": "A shop sells 12 pens a day for 5 days and 7 pens on the sixth day. "
           "How many pens in all? Solve step by step, then end with: The answer is N."}]


def _time(b: LlamaBackend) -> float:
    b.reset()
    t0 = time.perf_counter()
    b.generate(PROMPT, max_tokens=48)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tier", default="tactical")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args()
    settings = load_settings(None)
    tier = next(t for t in default_tiers() if t.name == a.tier)
    path = resolve_model(tier.source, settings.models_dir)
    adaptive = LlamaBackend(tier.model_copy(update={"n_threads": None}), path)
    pinned = LlamaBackend(tier.model_copy(update={"n_threads": 2}), path)
    for b in (adaptive, pinned):
        _time(b)  # load and warm up
    out: dict = {"command": " ".join(["python", *sys.argv]), "tier": a.tier, "cores": os.cpu_count(),
                 "load_before": os.getloadavg()[0]}
    for label, neighbour in (("beside_busy", True), ("without_neighbour", False)):
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
        time.sleep(1.0)
        times: dict[str, list[float]] = {"adaptive": [], "pinned_2": []}
        threads: list[int] = []
        try:
            for _ in range(a.reps):
                times["adaptive"].append(_time(adaptive))
                threads.append(adaptive.n_threads)
                times["pinned_2"].append(_time(pinned))
        finally:
            if spin is not None:
                spin.kill()
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        out[label] = {"median_s": med, "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                      "adaptive_threads": threads, "pinned_over_adaptive": round(med["pinned_2"] / med["adaptive"], 2)}
        print(f"{label}: adaptive {med['adaptive']} s (threads {threads}), pinned 2 threads {med['pinned_2']} s, "
              f"ratio {out[label]['pinned_over_adaptive']}")
    out["load_after"] = os.getloadavg()[0]
    print(f"load average before {out['load_before']:.2f}, after {out['load_after']:.2f} (cores {out['cores']})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
