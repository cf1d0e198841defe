"""Load on `dreamroute serve` in front of remote tiers of known speed (issue 13 §5).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --upstream fake --latency-ms 200 \
        --clients 1 16 64 256 --requests 512 --rate 100 --duration 20 --json benchmarks/results/serve_load.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py --upstream llama-server --clients 1 16 64 256 \
        --requests 64 --rate 0 --max-tokens 8 --json benchmarks/results/serve_load_llama_server.json

Three processes on loopback: the upstream, `dreamroute serve`, and this one (the clients).

* ``--upstream fake``: `benchmarks/fake_upstream.py`, which answers every request after exactly
  ``--latency-ms`` and reports how long it held each one (``GET /stats``).
* ``--upstream llama-server``: llama-cpp-python's OpenAI-compatible server (`python -m
  llama_cpp.server`) on the sensory GGUF, one thread; it answers one request at a time.

dreamroute serves two remote tiers, ``small`` and ``large`` (both that upstream; ``params_b`` 0.5
and 1.5, so their ATP differs and the router has a real choice), ``max_in_flight`` =
``--max-in-flight``, a fresh SQLite store, no budget, the reality cache off. Every request is
routed (``model: dreamroute``) and unique (``[req:ID]`` and its own numbers), so none is a
fast-path hit and each one's decision, upstream call and experience are real.

For each ``--clients`` C: C clients, each sending its next request when its last is answered,
until ``max(--requests, C)`` are answered: requests per second (and per core of this machine),
client latency p50/p99, and the router's overhead per request: the latency the client saw minus
the time the upstream held that request (fake upstream only; for llama-server, minus the median
direct latency measured first, so it is coarser). ``--rate R`` adds an open-loop phase: R
requests per second for ``--duration`` seconds whatever the answers' speed (the overhead at a
fixed load, the issue's "at 100 requests/s"). Then the server is stopped (SIGTERM) and the store
checked: one experience per answered request ("lost" counts the answered requests with none)
and ``ledger verify``. The server process's CPU seconds per request come from psutil.

The machine is 2 cores for all three processes, so the figures are what one box does with
the client and the upstream beside the router; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

from loopback import free_port, pct, wait_http   # noqa: E402 (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sensory_gguf() -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from dreamroute.config import load_settings
    from dreamroute.backends.registry import resolve_model
    settings = load_settings(None)
    return str(resolve_model(settings.tier("sensory").source, settings.models_dir))


def start_upstream(kind: str, latency_ms: float, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "fake":
        cmd = [PY, str(ROOT / "benchmarks/fake_upstream.py"), "--port", str(port), "--latency-ms", str(latency_ms)]
    else:
        cmd = [PY, "-m", "llama_cpp.server", "--model", sensory_gguf(), "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--n_threads", "1", "--model_alias", "fake"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def write_config(d: Path, base_url: str, max_in_flight: int, timeout_s: float) -> Path:
    tiers = [{"name": name, "model": f"remote {name}", "backend": "openai", "base_url": base_url,
              "remote_model": "fake", "params_b": p, "timeout_s": timeout_s,
              "max_in_flight": max_in_flight, "max_queue": 4096} for name, p in (("small", 0.5), ("large", 1.5))]
    cfg = {"tiers": tiers, "data_dir": str(d / "data"), "cache": {"enabled": False},
           "server": {"request_timeout_s": 600.0}}
    path = d / "serve_load.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def closed_loop(base: str, n: int, clients: int, start: int, max_tokens: int):
    """``n`` requests over ``clients`` clients that each wait for their answer:
    (latencies s by id, wall s, errors)."""
    lat: dict[str, float] = {}
    errors: list[str] = []
    ids = iter(range(start, start + n))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def one_client():
            for i in ids:
                await send(client, i, max_tokens, lat, errors)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return lat, time.perf_counter() - t0, errors


async def open_loop(base: str, rate: float, duration: float, start: int, max_tokens: int):
    """``rate`` requests per second for ``duration`` s, each sent on schedule: (latencies, wall, errors)."""
    lat: dict[str, float] = {}
    errors: list[str] = []
    n = int(rate * duration)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=1024)) as client:
        t0 = time.perf_counter()
        tasks = []
        for k in range(n):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, start + k, max_tokens, lat, errors)))
        await asyncio.gather(*tasks)
        return lat, time.perf_counter() - t0, errors


async def send(client: httpx.AsyncClient, i: int, max_tokens: int, lat: dict, errors: list) -> None:
    body = {"model": "dreamroute", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"[req:{i}] Add {i % 97} and {i // 97}. What is the sum?"}]}
    t = time.perf_counter()
    try:
        r = await client.post("/chat/completions", json=body)
        if r.status_code == 200:
            lat[str(i)] = time.perf_counter() - t
        else:
            errors.append(f"{r.status_code}: {r.text[:160]}")
    except httpx.HTTPError as e:
        errors.append(f"{type(e).__name__}: {e}")


def phase(name: str, lat: dict, wall: float, errors: list, held: dict, base_ms: float | None,
          cpu_s: float) -> dict:
    ms = [v * 1e3 for v in lat.values()]
    if held:
        over = [lat[k] * 1e3 - held[k] for k in lat if k in held]
    else:
        over = [m - base_ms for m in ms] if base_ms is not None else []
    n = len(lat)
    return {"phase": name, "answered": n, "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "rps": n / wall if wall else None, "rps_per_core": n / wall / (os.cpu_count() or 1) if wall else None,
            "latency_p50_ms": pct(ms, 50), "latency_p99_ms": pct(ms, 99),
            "overhead_p50_ms": pct(over, 50), "overhead_p99_ms": pct(over, 99),
            "overhead_from": "upstream held time" if held else "median direct latency",
            "server_cpu_ms_per_request": 1e3 * cpu_s / n if n else None,
            "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", choices=["fake", "llama-server"], default="fake")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--rate", type=float, default=100.0, help="open-loop requests per second (0: skip)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        d = Path(tmp)
        log = open(d / "procs.log", "w")
        upstream, up_url = start_upstream(a.upstream, a.latency_ms, log)
        port = free_port()
        cfg = write_config(d, up_url, a.max_in_flight, 600.0)
        db = d / "store.db"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen([str(ROOT / ".venv/bin/dreamroute"), "serve", "--config", str(cfg), "--db", str(db),
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        results, answered = [], set()
        try:
            wait_http(f"http://127.0.0.1:{port}/health", server)
            base = f"http://127.0.0.1:{port}/v1"
            sproc = psutil.Process(server.pid)
            base_ms = None
            if a.upstream == "llama-server":   # direct latency of the same requests, one at a time
                direct = []
                with httpx.Client(base_url=up_url, timeout=600) as c:
                    for i in range(8):
                        t = time.perf_counter()
                        c.post("/chat/completions", json={"model": "fake", "max_tokens": a.max_tokens, "messages": [
                            {"role": "user", "content": f"[req:d{i}] Add {i} and {i + 3}. What is the sum?"}]})
                        direct.append((time.perf_counter() - t) * 1e3)
                base_ms = statistics.median(direct)
            asyncio.run(closed_loop(base, 8, 2, 10**7, a.max_tokens))   # warm-up (not counted)
            start = 0
            plans = [(f"closed, {c} clients", c) for c in a.clients] + ([("open, rate", 0)] if a.rate > 0 else [])
            for name, c in plans:
                if a.upstream == "fake":
                    httpx.delete(up_url.rsplit("/v1", 1)[0] + "/stats")
                cpu0 = sum(sproc.cpu_times()[:2])
                if c:
                    n = max(a.requests, c)
                    lat, wall, errs = asyncio.run(closed_loop(base, n, c, start, a.max_tokens))
                else:
                    n = int(a.rate * a.duration)
                    name = f"open, {a.rate:g} requests/s for {a.duration:g} s"
                    lat, wall, errs = asyncio.run(open_loop(base, a.rate, a.duration, start, a.max_tokens))
                cpu = sum(sproc.cpu_times()[:2]) - cpu0
                held = httpx.get(up_url.rsplit("/v1", 1)[0] + "/stats").json()["held_ms"] if a.upstream == "fake" else {}
                res = phase(name, lat, wall, errs, held, base_ms, cpu)
                res["clients"] = c or None
                results.append(res)
                answered |= set(lat)
                print(json.dumps(res), flush=True)
                start += n
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    server.kill()
            upstream.terminate()
            upstream.wait(30)
        sys.path.insert(0, str(ROOT / "src"))
        from dreamroute.store.store import Store
        with Store(db) as store:
            stored = {r["prompt"].split("]")[0].removeprefix("[req:")
                      for r in store.experiences(["prompt"]) if r["prompt"].startswith("[req:")}
            verify = store.verify_ledger()
        lost = len(answered - stored)
        out = {"upstream": a.upstream, "latency_ms": a.latency_ms if a.upstream == "fake" else None,
               "cores": os.cpu_count(), "max_in_flight": a.max_in_flight, "phases": results,
               "answered": len(answered), "lost_experiences": lost, "ledger_ok": bool(verify.ok),
               "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
        print(f"\n{'phase':<42} {'rps':>7} {'rps/core':>8} {'lat p50':>8} {'lat p99':>8} {'ovh p50':>8} "
              f"{'ovh p99':>8} {'cpu ms/req':>10} {'err':>4}")
        for r in results:
            f = lambda x: "-" if x is None else f"{x:.1f}"   # noqa: E731
            print(f"{r['phase']:<42} {f(r['rps']):>7} {f(r['rps_per_core']):>8} {f(r['latency_p50_ms']):>8} "
                  f"{f(r['latency_p99_ms']):>8} {f(r['overhead_p50_ms']):>8} {f(r['overhead_p99_ms']):>8} "
                  f"{f(r['server_cpu_ms_per_request']):>10} {r['errors']:>4}")
        print(f"answered {len(answered)}, lost experiences {lost}, ledger verify {'ok' if verify.ok else 'FAILED'}")
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
