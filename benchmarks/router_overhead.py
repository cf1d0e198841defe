"""Router overhead: the decision alone (model time and the prompt encoder excluded) at 10,000 and
100,000 stored experiences; recall@20 of the approximate index; the encoder's time per prompt.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/router_overhead.py \\
        --sizes 10000 100000 --requests 1000 --encoder ngram --json benchmarks/results/router_overhead.json

For each size: a router with scripted backends (the default hierarchy's tier names and sizes)
first answers 600 GSM8K train questions through the engine, graded against their gold answers
(so trust, calibration and the answer judges are fitted as in use), then its experience index
is filled to the size with more experiences (GSM8K train questions and generated word problems,
every prompt a different one, each encoded by the router's encoder, with outcomes drawn per tier), and then it routes
``--requests`` held-back questions with the ``dreamroute`` policy and a budget.
``Decision.overhead_cpu_ms`` (this thread's CPU time: features, neighbours, signals, policy)
is reported as p50/p90/p99/max, with the wall time beside it. The prompt is encoded before the
request is routed and its vector served from the encoder's cache inside the decision, so a
model encoder's time is timed apart: ``encoder_ms`` is the encoder's time per prompt on
prompts it has not seen (CPU and wall), against the cheapest tier's time to first token
(``benchmarks/results/bench.json``). ``recall_at_20`` compares, for 200 held-back prompts and
each tier whose block is searched through HNSW, the approximate 20 nearest rows with the
exact 20 nearest (a row tying the exact 20th's cosine counts as found). The load average at the end says how busy the machine was.
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
from dreamroute.eval.generated import generate_problems  # noqa: E402
from dreamroute.eval.workloads import iter_items  # noqa: E402

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
BENCH = Path(__file__).resolve().parent / "results" / "bench.json"
SKILL = {"sensory": 9, "tactical": 3, "specialized": 2}  # tier right on 1 in k prompts (by hash)


def backends(gold: dict[str, str]) -> dict:
    def make(name, k):
        def script(messages):
            p = messages[-1]["content"]
            g = gold.get(p, "0")
            return f"Working it out. The answer is {g}." if hash((name, p)) % k == 0 else "Not sure, maybe 7"
        return ScriptedBackend(f"sha-{name}", script)
    return {t: make(t, k) for t, k in SKILL.items()}


def pct(a) -> dict:
    a = np.asarray(a)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def fill(dr, texts: list[str], size: int, rng: np.random.Generator) -> float:
    """Add experiences to the router's index until it holds ``size``; returns the seconds it took."""
    mem = dr.memory
    t0 = time.perf_counter()
    i = 0
    while len(mem.index) < size:
        batch = [texts[(i + j) % len(texts)] for j in range(min(2000, size - len(mem.index)))]
        i += len(batch)
        vecs = mem.encoder.encode_many(batch)
        tiers = rng.integers(0, len(mem.tiers), len(batch))
        p = np.array([1 / SKILL[mem.tiers[t]] for t in tiers])
        outcomes = (rng.random(len(batch)) < p).astype(np.float32)
        atp = np.array([5.0, 20.0, 60.0])[tiers]
        mem.index.add_many(vecs, tiers, outcomes, atp, -np.arange(len(batch)) - i)
    return time.perf_counter() - t0


def encoder_time(encoder, prompts: list[str]) -> dict:
    wall, cpu = [], []
    for p in prompts:
        c0, w0 = time.thread_time(), time.perf_counter()
        encoder.encode(p + " ")  # a variant it has not seen: no cache hit
        cpu.append((time.thread_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return {"cpu_ms": pct(cpu), "wall_ms": pct(wall), "prompts": len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--encoder", default="ngram", help="ngram | minilm-int8 | minilm")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    items = list(iter_items(str(TRAIN)))
    gold = {it.prompt: it.answer for it in items}
    held = items[-a.requests:]
    warm = items[:600]
    need = max(a.sizes) - (len(items) - 600 - a.requests)
    texts = [it.prompt for it in items[600:-a.requests]] + [it.prompt for it in generate_problems(max(0, need), seed=11)]
    rng = np.random.default_rng(0)
    results = []
    for size in a.sizes:
        with tempfile.TemporaryDirectory() as d:
            settings = scripted_settings(Path(d), encoder=a.encoder)
            dr = DreamRoute(settings, db=Path(d) / "bench.db", backends=backends(gold), policy="dreamroute",
                            budget=25.0)
            for it in warm:
                dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
            fill_s = fill(dr, texts, size, rng)
            enc = encoder_time(dr.memory.encoder, [it.prompt for it in held[:200]])
            ov, cpu = [], []
            for it in held:
                dr.memory.encoder.encode(it.prompt)  # encoded apart (cached): the decision below excludes it
                ans = dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
                ov.append(ans.decision.overhead_ms)
                cpu.append(ans.decision.overhead_cpu_ms)
            qs = dr.memory.encoder.encode_many([it.prompt for it in held[:200]])
            recalls = [r for r in (dr.memory.index.recall_at(q, 20) for q in qs) if r is not None]
            results.append({"experiences": len(dr.memory.index), "requests": len(ov), "fill_s": fill_s,
                            "approximate_tiers": [dr.memory.tiers[t] for t in dr.memory.index.approximate_tiers],
                            "overhead_ms": pct(ov), "overhead_cpu_ms": pct(cpu),
                            "recall_at_20": float(np.mean(recalls)) if recalls else None, "encoder": enc})
            dr.close()
        print(json.dumps(results[-1], indent=2), flush=True)
    ttft = None
    if BENCH.exists():
        ttft = {r["tier"]: r["ttft_s"] for r in json.loads(BENCH.read_text())}.get("sensory")
    out = {"encoder": a.encoder, "sizes": results, "cheapest_tier_ttft_s": ttft,
           "encoder_share_of_ttft": (results[0]["encoder"]["wall_ms"]["p50"] / 1e3 / ttft) if ttft else None,
           "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps({k: v for k, v in out.items() if k != "sizes"}, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
