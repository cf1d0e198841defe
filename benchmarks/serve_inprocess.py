"""A bounded load test of the server on loopback, against llama.cpp called directly (issue 6).

    DREAMROUTE_THREADS=1 .venv/bin/python benchmarks/serve_inprocess.py [--n 48] [--clients 4] \
        [--max-tokens 32] [--tier sensory] [--json benchmarks/results/serve_load.json]

In one process, on the real ``--tier`` model of the default hierarchy and a temporary store, with
the ``--n`` prompts (built-in generated word problems):

1. ``paired``: each prompt through the tier's ``LlamaBackend.generate`` directly in this process
   (as an embedding program calls llama.cpp) and as ``POST /v1/chat/completions`` (``model:
   TIER``) to a ``dreamroute serve`` process on 127.0.0.1 (its own process, as a real server;
   the clients are this process), one right after the other (the order alternating), so both
   see the same machine: the server's overhead per request is the difference on the same prompt;
2. ``concurrent``: blocks of ``2 × --clients`` prompts, each block sent once by ``--clients``
   concurrent clients and once directly one after the other (order alternating): requests per
   second, p50/p99 latency, errors, and throughput against direct calls over the same blocks;
3. feedback on every answer (graded against the problem's answer), then the check that nothing
   was lost: the store holds one experience per answered request, one ledger entry per
   feedback, and ``ledger verify`` passes.

Prints a table and writes ``--json``. The server answers one request at a time (one model, one
engine lock), so concurrency queues: its throughput is bounded by the model's, and what it
costs is the overhead per request. Pairing and alternating is what makes the figures hold on a
shared machine, where the speed of a core changes from minute to minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from dreamroute.backends import make_backend
from dreamroute.config import load_settings
from dreamroute.eval.generated import generate_problems
from dreamroute.grading import get_grader
from dreamroute.store.store import Store


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(lat: list[float], wall: float) -> dict:
    return {"n": len(lat), "wall_s": wall, "rps": len(lat) / wall if wall else None,
            "p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99), "mean_ms": 1e3 * statistics.fmean(lat)}


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def ask(client: httpx.Client, tier: str, prompt: str, max_tokens: int) -> dict:
    r = client.post("/v1/chat/completions", json={
        "model": tier, "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
    return r.json()


async def clients(base: str, tier: str, prompts: list[str], max_tokens: int, n_clients: int):
    """Each prompt once, spread over ``n_clients`` concurrent clients: (latencies, wall, answers, errors)."""
    queue = list(enumerate(prompts))
    lat: list[float] = [0.0] * len(prompts)
    answers: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []

    async def worker(client: httpx.AsyncClient):
        while queue:
            i, p = queue.pop(0)
            t = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json={
                    "model": tier, "max_tokens": max_tokens, "messages": [{"role": "user", "content": p}]})
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                answers[i] = r.json()
            except httpx.HTTPError as e:
                errors.append(repr(e))
                continue
            lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await asyncio.gather(*[worker(client) for _ in range(n_clients)])
    return [x for x, a in zip(lat, answers) if a is not None], time.perf_counter() - t0, answers, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tier", default="sensory")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    items = generate_problems(a.n, seed=7)
    prompts = [it.prompt for it in items]
    tmp = Path(tempfile.mkdtemp(prefix="dreamroute-load-"))
    settings = load_settings(None, data_dir=str(tmp), db=str(tmp / "load.db"),
                             model_cache=str(load_settings(None).models_dir))
    settings.cache.enabled = False
    settings.metabolic.enabled = False  # no REST unloading in the middle of a measurement
    baseline = make_backend(settings.tier(a.tier), settings)
    baseline.generate([{"role": "user", "content": "Warm up."}], max_tokens=4)
    # the server: `dreamroute serve` in its own process, on the same settings and a fresh store
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp), "model_cache": str(settings.models_dir),
                                   "cache": {"enabled": False}, "metabolic": {"enabled": False}}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from dreamroute.cli import app; app()", "serve", "--port",
                             str(port), "--config", str(cfg), "--db", str(tmp / "load.db")],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            sys.exit(f"dreamroute serve exited: {(tmp / 'serve.log').read_text()[-2000:]}")
        time.sleep(0.1)
    call = lambda p: baseline.generate([{"role": "user", "content": p}], max_tokens=a.max_tokens)  # noqa: E731
    http = httpx.Client(base_url=base, timeout=600)
    ask(http, a.tier, "Warm up.", 4)

    # 1. paired: direct and server on the same prompt, back to back, order alternating
    d_lat, s_lat, answered, errors = [], [], [], []
    for i, p in enumerate(prompts):
        order = ("d", "s") if i % 2 == 0 else ("s", "d")
        for who in order:
            if who == "d":
                d_lat.append(timed(call, p)[0])
            else:
                try:
                    t, out = timed(ask, http, a.tier, p, a.max_tokens)
                    s_lat.append(t)
                    answered.append((items[i], out))
                except (RuntimeError, httpx.HTTPError) as e:
                    errors.append(repr(e))
    over = [s - d for s, d in zip(s_lat, d_lat)] if len(s_lat) == len(d_lat) else []

    # 2. concurrent: blocks sent by C clients and directly, order alternating
    size = 2 * a.clients
    c_lat, c_wall, cd_wall = [], 0.0, 0.0
    for b, i in enumerate(range(0, len(prompts), size)):
        block = prompts[i:i + size]
        for who in (("d", "s") if b % 2 == 0 else ("s", "d")):
            if who == "d":
                cd_wall += timed(lambda: [call(p) for p in block])[0]
            else:
                lat, wall, outs, errs = asyncio.run(clients(base, a.tier, block, a.max_tokens, a.clients))
                c_lat += lat
                c_wall += wall
                errors += errs
                answered += [(items[i + j], o) for j, o in enumerate(outs) if o is not None]

    # 3. feedback on every answer, graded; then what the store holds
    fb_errors = 0
    grader = get_grader("gsm8k")
    for it, ans in answered:
        ok = grader.grade(ans["choices"][0]["message"]["content"], it.answer).correct
        r = http.post("/v1/feedback", json={"id": ans["id"], "outcome": "success" if ok else "failure"})
        fb_errors += r.status_code != 200
    ids = {x["dreamroute"]["request_id"] for _, x in answered}
    http.close()
    proc.terminate()  # SIGTERM: uvicorn shuts down; everything answered was committed before its reply
    proc.wait(60)
    log.close()
    with Store(tmp / "load.db") as store:
        stored = {r["request_id"] for r in store.experiences(["request_id"])}
        feedback_entries = sum(1 for e in store.ledger_entries()
                               if e["delta"].get("reason", "").startswith("feedback"))
        verify = store.verify_ledger()
    report = {
        "tier": a.tier, "n": a.n, "clients": a.clients, "max_tokens": a.max_tokens,
        "direct": summary(d_lat, sum(d_lat)), "server_1_client": summary(s_lat, sum(s_lat)),
        f"server_{a.clients}_clients": summary(c_lat, c_wall), "direct_same_blocks_s": cd_wall,
        "overhead_ms": {"p50": 1e3 * pct(over, 50), "p99": 1e3 * pct(over, 99), "mean": 1e3 * statistics.fmean(over),
                        "p50_ratio": pct(s_lat, 50) / pct(d_lat, 50)} if over else None,
        "rps_ratio_vs_direct": cd_wall / c_wall if c_wall else None,
        "errors": len(errors), "error_samples": errors[:5], "feedback_errors": fb_errors,
        "answered": len(answered), "stored_requests": len(ids & stored), "lost_experiences": len(ids - stored),
        "feedback_ledger_entries": feedback_entries, "lost_ledger_entries": len(answered) - feedback_entries,
        "ledger_verify": verify.ok,
    }
    print(f"{'':24} {'n':>4} {'rps':>7} {'p50 ms':>9} {'p99 ms':>9}")
    for k in ("direct", "server_1_client", f"server_{a.clients}_clients"):
        r = report[k]
        print(f"{k:24} {r['n']:4d} {r['rps']:7.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f}")
    if report["overhead_ms"]:
        o = report["overhead_ms"]
        print(f"server overhead per request (1 client − direct, same prompt): p50 {o['p50']:.1f} ms, "
              f"p99 {o['p99']:.1f} ms, mean {o['mean']:.1f} ms")
    print(f"throughput with {a.clients} clients / direct on the same blocks: {report['rps_ratio_vs_direct']:.3f}")
    print(f"errors {report['errors']}, lost experiences {report['lost_experiences']}, lost ledger entries "
          f"{report['lost_ledger_entries']}, ledger verify {'ok' if verify.ok else 'FAILED'}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    baseline.close()
    return 0 if report["errors"] == 0 and report["lost_experiences"] == 0 and verify.ok else 1


if __name__ == "__main__":
    sys.exit(main())
