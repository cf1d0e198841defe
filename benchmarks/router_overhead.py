"""Router overhead: the decision alone (model time excluded) with 10,000 stored experiences.

    .venv/bin/python benchmarks/router_overhead.py [--experiences 10000] [--requests 1000] [--json FILE]

Fills a temporary store with N experiences (GSM8K train questions answered by
scripted backends, graded against their gold answers), restarts the router
from the store (as a new process would), then routes held-back questions
with the ``dreamroute`` policy and prints p50/p99 of ``Decision.overhead_ms``
(features, neighbours, signals, policy; the surprise scoring call is model
time and excluded). Also reports the time to rebuild the index from the store. Wall time
suffers from whatever else the machine runs; ``overhead_cpu_ms`` (this
thread's CPU time) measures the same work without the waits, and the load
average at the end says how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import scripted_settings  # noqa: E402

from dreamroute import DreamRoute  # noqa: E402
from dreamroute.backends.scripted import ScriptedBackend  # noqa: E402
from dreamroute.eval.workloads import iter_items  # noqa: E402

TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")


def backends(gold: dict[str, str]) -> dict:
    def make(name, k):
        def script(messages):
            p = messages[-1]["content"]
            g = gold.get(p, "0")
            return f"Working it out. The answer is {g}." if hash((name, p)) % k == 0 else "Not sure, maybe 7"
        return ScriptedBackend(f"sha-{name}", script)
    return {"sensory": make("sensory", 9), "tactical": make("tactical", 3), "specialized": make("specialized", 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiences", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    items = list(iter_items(str(TRAIN)))
    gold = {it.prompt: it.answer for it in items}
    with tempfile.TemporaryDirectory() as d:
        settings = scripted_settings(Path(d))
        db = Path(d) / "bench.db"
        with DreamRoute(settings, db=db, backends=backends(gold), policy="always:tactical") as dr:
            i = 0
            while dr.store.count_experiences() < a.experiences:
                it = items[i % len(items)]
                dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
                i += 1
            n_exp = dr.store.count_experiences()
        t0 = time.perf_counter()
        dr = DreamRoute(settings, db=db, backends=backends(gold), policy="dreamroute", budget=50.0)
        rebuild_s = time.perf_counter() - t0
        held = items[-a.requests:]
        ov, cpu = [], []
        for it in held:
            ans = dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
            ov.append(ans.decision.overhead_ms)
            cpu.append(ans.decision.overhead_cpu_ms)
        dr.close()

    def pct(a):
        a = np.asarray(a)
        return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())}

    out = {"experiences": n_exp, "requests": len(ov), "index_rebuild_s": rebuild_s,
           "overhead_ms": pct(ov), "overhead_cpu_ms": pct(cpu),
           "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
