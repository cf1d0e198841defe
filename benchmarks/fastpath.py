"""Fast-path latency in process: cached-answer lookups, and whole requests through the app.

    .venv/bin/python benchmarks/fastpath.py [--entries 500] [--n 5000] [--json out.json]

On scripted backends (no model runs) and a temporary store: ``--entries`` questions are
answered and graded correct (ground truth), which makes them servable; then it times

* ``lookup hit`` / ``lookup miss``: ``DreamRoute.cached(messages)`` (normalise, hash, look up);
* ``ASGI hit``: a whole ``POST /v1/chat/completions`` answered by the fast path, through the
  app's ASGI stack (httpx ``ASGITransport``: middleware, JSON parsing and validation, response);
* ``ASGI miss``: the same for a new question, routed (the router's decision, a scripted call,
  storing the experience): what the fast path saves, without any model time.

Prints p50 / p99 / mean in milliseconds (the DESIGN.md target: a hit well under 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig
from dreamroute.server import create_app

TIERS = (("sensory", 0.135), ("tactical", 0.5), ("specialized", 1.5))
SYSTEM = "You are a careful assistant. Solve step by step, then end with: The answer is N."


def question(i: int) -> str:
    return f"A shop sells {i + 3} boxes of {i % 7 + 2} pencils each. How many pencils does it sell?"


def messages(i: int) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(i)}]


def answer(msgs: list[dict]) -> str:
    words = msgs[-1]["content"].split()
    boxes, per = int(words[3]), int(words[6])
    return f"{boxes} boxes times {per} pencils is {boxes * per}. The answer is {boxes * per}."


def stats(ns: list[int]) -> dict:
    ms = sorted(x / 1e6 for x in ns)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 4), "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 4),
            "mean_ms": round(statistics.fmean(ms), 4)}


def timed(fn, n: int) -> list[int]:
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append(time.perf_counter_ns() - t0)
    return out


async def timed_requests(app, bodies, repeat: int) -> list[int]:
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        for i in range(repeat):
            body = bodies(i)
            t0 = time.perf_counter_ns()
            r = await client.post("/v1/chat/completions", json=body)
            out.append(time.perf_counter_ns() - t0)
            assert r.status_code == 200, r.text
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=500, help="answers made servable first")
    ap.add_argument("--n", type=int, default=5000, help="timed lookups per kind")
    ap.add_argument("--requests", type=int, default=1000, help="timed requests through the app per kind")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dreamroute-fastpath-") as tmp:
        tiers = [TierConfig(name=n, model=f"scripted-{n}", backend="scripted", params_b=p) for n, p in TIERS]
        settings = Settings(tiers=tiers, data_dir=Path(tmp))
        backends = {n: ScriptedBackend(f"sha-{n}", answer) for n, _ in TIERS}
        with DreamRoute(settings, db=Path(tmp) / "bench.db", backends=backends, fast_path=True,
                        policy="always:tactical") as dr:
            t0 = time.perf_counter()
            for i in range(args.entries):
                msgs = messages(i)
                gold = answer(msgs).rsplit(" ", 1)[-1].rstrip(".")
                dr.complete(msgs, gold=gold, grader="gsm8k")
            seed_s = time.perf_counter() - t0
            assert len(dr.responses) == args.entries
            k = args.entries
            res = {"entries": k, "seed_s": round(seed_s, 2),
                   "lookup_hit": stats(timed(lambda i: dr.cached(messages(i % k)), args.n)),
                   "lookup_miss": stats(timed(lambda i: dr.cached(messages(k + i)), args.n))}
            app = create_app(settings, dr=dr)
            hit_body = lambda i: {"model": "dreamroute", "messages": messages(i % k)}        # noqa: E731
            miss_body = lambda i: {"model": "dreamroute", "messages": messages(10 * k + i)}  # noqa: E731
            res["asgi_hit"] = stats(asyncio.run(timed_requests(app, hit_body, args.requests)))
            n_exp = dr.store.count_experiences()
            res["asgi_miss"] = stats(asyncio.run(timed_requests(app, miss_body, min(args.requests, 300))))
            assert app.state.dreamroute.fast.hits == args.requests
            assert dr.store.count_experiences() > n_exp
    for name in ("lookup_hit", "lookup_miss", "asgi_hit", "asgi_miss"):
        s = res[name]
        print(f"{name:12s} n={s['n']:5d}  p50 {s['p50_ms']:8.4f} ms  p99 {s['p99_ms']:8.4f} ms  mean {s['mean_ms']:8.4f} ms")
    print(f"({res['entries']} servable answers; seeding them took {res['seed_s']} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
