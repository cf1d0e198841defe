"""A server killed (SIGKILL) in the middle of a request loses no stored experience, and the
ledger verifies afterwards; the restarted server carries on from the same store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx

from dreamroute.store.store import Store

SERVER = textwrap.dedent('''
    import sys, time
    import uvicorn
    from dreamroute import DreamRoute
    from dreamroute.backends.scripted import ScriptedBackend
    from dreamroute.config import Settings, TierConfig
    from dreamroute.server import create_app

    db, port = sys.argv[1], int(sys.argv[2])

    def script(messages):
        if "SLOW" in messages[-1]["content"]:
            time.sleep(60)  # killed before it answers
        return "The answer is 4."

    tiers = [TierConfig(name=n, model=n, backend="scripted", params_b=p)
             for n, p in (("sensory", 0.135), ("tactical", 0.5), ("specialized", 1.5))]
    settings = Settings(tiers=tiers, data_dir=sys.argv[3])
    backends = {t.name: ScriptedBackend("sha-" + t.name, script) for t in tiers}
    dr = DreamRoute(settings, db=db, backends=backends, fast_path=True, cooldown_s=60)
    uvicorn.run(create_app(settings, dr=dr), host="127.0.0.1", port=port, log_level="warning")
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, port):
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s.db"), str(port), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)


def ask(port, text):
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                      json={"model": "dreamroute", "messages": [{"role": "user", "content": text}]})


def test_kill_during_a_request_loses_nothing_stored(tmp_path):
    port = free_port()
    p = start(tmp_path, port)
    try:
        ids = [ask(port, f"What is {i} + 4 - {i}?").json()["dreamroute"]["request_id"] for i in range(3)]
        fb = httpx.post(f"http://127.0.0.1:{port}/v1/feedback", json={"id": ids[0], "outcome": "success"})
        assert fb.status_code == 200
        errors = []
        t = threading.Thread(target=lambda: errors.append(_swallow(port)))
        t.start()
        time.sleep(1.0)  # the slow request is inside the backend now
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        t.join(30)
    finally:
        if p.poll() is None:
            p.kill()
    with Store(tmp_path / "s.db") as s:
        rows = s.experiences(["request_id", "outcome", "witness"])
        assert {r["request_id"] for r in rows} == set(ids)           # every answered request is on record
        assert any(r["outcome"] == "success" and r["witness"] == "user:api" for r in rows)
        assert s.verify_ledger().ok
        n_ledger = len(s.ledger_entries())
    p = start(tmp_path, port)  # the restarted server carries on from the same store
    try:
        assert ask(port, "What is 2 + 2?").status_code == 200
        trust = httpx.get(f"http://127.0.0.1:{port}/v1/trust").json()
        assert trust["fast_path"]["entries"] >= 1                    # the witnessed answer was reloaded
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    with Store(tmp_path / "s.db") as s:
        assert s.verify_ledger().ok and len(s.ledger_entries()) >= n_ledger
        assert len({r["request_id"] for r in s.experiences(["request_id"])}) == 4


def _swallow(port):
    try:
        return ask(port, "SLOW: what is 1 + 1?").status_code
    except httpx.HTTPError as e:
        return type(e).__name__
