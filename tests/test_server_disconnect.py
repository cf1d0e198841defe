"""A client that disconnects stops its generation within a few tokens, nothing of it is recorded as
an answer, and the next request does not wait for it: through the ASGI app (the disconnect at a
chosen moment) and over a socket (uvicorn, a client that times out)."""

from __future__ import annotations

import json
import sqlite3
import time

import anyio
import httpx
import pytest

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.router.gate import TierGate

from .conftest import TIERS
from .test_server import Q, make, stored, user
from .test_server_live import served

TOKEN_S = 0.05      # the slow tier's seconds per generated word (slept)
LONG = " ".join(f"w{i}" for i in range(400))   # 20 s of words at TOKEN_S


def slow_tiers():
    """sensory answers at once; tactical and specialized really take TOKEN_S per word of a long answer."""
    def tier(n):
        if n == "sensory":
            return ScriptedBackend(f"sha-{n}", lambda m: "sensory says: 91 is 7 times 13.")
        return ScriptedBackend(f"sha-{n}", lambda m: LONG, decode_s_per_token=TOKEN_S, prefill_s_per_token=0.0,
                               realtime=True)
    return {n: tier(n) for n in TIERS}


def cancelled_rows(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT tier, tokens, atp_joules, seconds FROM background_work WHERE kind = 'cancelled'"
                           ).fetchall()
    finally:
        con.close()


async def asgi_post(app, body: dict, *, disconnect_after: float | None) -> tuple[int, bytes, float]:
    """POST /v1/chat/completions straight into the ASGI app; the client disconnects ``disconnect_after``
    seconds after sending (None: never). Returns (status, body, seconds until the app returned)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    t0 = time.monotonic()
    sent, out, status = False, [], None
    done = anyio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if disconnect_after is None:
            await done.wait()
        elif time.monotonic() < t0 + disconnect_after:  # once gone, answered at once (as uvicorn does)
            await anyio.sleep(t0 + disconnect_after - time.monotonic())
        return {"type": "http.disconnect"}

    async def send(msg):
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            out.append(msg.get("body", b""))
            if not msg.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(out), time.monotonic() - t0


@pytest.mark.parametrize("stream", [False, True])
def test_a_disconnect_stops_the_generation_within_a_few_tokens(tmp_path, stream):
    c, dr = make(tmp_path, slow_tiers())
    before = stored(dr, tmp_path / "s.db")
    status, body, secs = anyio.run(lambda: asgi_post(c.app, {"model": "specialized", "messages": user(Q),
                                                             "max_tokens": 400, "stream": stream},
                                                     disconnect_after=0.4))
    assert secs < 0.4 + 10 * TOKEN_S                            # not the 20 s the answer takes
    if stream:  # a pinned tier streams as it generates: the stream had begun, and ends without [DONE]
        assert status == 200 and b'"content":"w0' in body and b"[DONE]" not in body
    else:
        assert status == 499
    (tier, tokens, atp, seconds), = cancelled_rows(tmp_path / "s.db")
    prompt = len(dr.backends["specialized"].prompt_tokens(user(Q)))
    assert tier == "specialized" and atp > 0 and seconds < 1.0
    assert tokens - prompt <= 0.4 / TOKEN_S + 5                 # a few tokens past the disconnect
    n_exp, n_ledger, _, outcomes, trust = stored(dr, tmp_path / "s.db")
    assert (n_exp, n_ledger, outcomes, trust) == (before[0], before[1], before[3], before[4])   # no answer on record
    assert dr.pacer.spent == pytest.approx(atp)                 # its ATP still counts against the budget
    r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": user(Q)})
    assert r.status_code == 200 and dr.store.count_experiences() == 1


def test_the_next_request_does_not_wait_and_a_queued_one_that_leaves_never_runs(tmp_path):
    c, dr = make(tmp_path, slow_tiers())
    dr.gates["specialized"] = TierGate("specialized", 1, 4)    # one call at a time, as a llama.cpp tier
    slow, fast = dr.backends["specialized"], dr.backends["sensory"]
    results: dict = {}

    async def main():
        async def one(name, body, after, delay):
            await anyio.sleep(delay)
            t = time.monotonic()
            results[name] = (*await asgi_post(c.app, body, disconnect_after=after), time.monotonic() - t)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "left", {"model": "specialized", "messages": user(Q), "max_tokens": 400}, 0.5, 0)
            tg.start_soon(one, "queued", {"model": "specialized", "messages": user(Q), "max_tokens": 400}, 0.2, 0.1)
            tg.start_soon(one, "next", {"model": "sensory", "messages": user(Q)}, None, 0.15)
    anyio.run(main)
    assert results["left"][0] == 499 and results["queued"][0] == 499 and results["next"][0] == 200
    assert results["queued"][2] < 0.5                           # gave up while waiting for the tier's turn
    assert len(slow.calls) == 1                                 # ... and never ran
    assert results["next"][2] < 0.35                            # another tier: it did not wait for either
    assert len(fast.calls) == 1
    assert dr.store.count_experiences() == 1 and len(cancelled_rows(tmp_path / "s.db")) == 1


def test_a_client_that_times_out_over_a_socket(tmp_path):
    c, dr = make(tmp_path, slow_tiers())
    with served(c.app) as url, httpx.Client(base_url=url, trust_env=False) as http:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json={"model": "specialized", "messages": user(Q), "max_tokens": 400},
                      timeout=0.4)     # (streamed, a pinned tier's words would keep the client reading)
        r = http.post("/v1/chat/completions", json={"model": "sensory", "messages": user("And 17 + 25?")},
                      timeout=10)
        assert r.status_code == 200 and r.json()["dreamroute"]["tier"] == "sensory"
        assert time.monotonic() - t0 < 0.4 + 20 * TOKEN_S         # far from the 20 s answer
        deadline = time.monotonic() + 5
        while not cancelled_rows(tmp_path / "s.db") and time.monotonic() < deadline:
            time.sleep(0.02)
    rows = [r["tier"] for r in dr.store.experiences(["tier"])]
    assert rows == ["sensory"]                                  # the abandoned request is not on record
    (tier, tokens, _, _), = cancelled_rows(tmp_path / "s.db")
    assert tier == "specialized"


def test_a_request_cancelled_during_its_escalation_records_nothing_but_its_atp(tmp_path):
    from dreamroute import DreamRoute
    from dreamroute.backends.base import GenOptions
    from dreamroute.errors import GenerationCancelled

    from .conftest import scripted_settings

    backends = {n: ScriptedBackend(f"sha-{n}", lambda m, n=n: f"{n} thinks maybe three or four",
                                   logprob=-3.0 if n == "sensory" else -0.1) for n in TIERS}
    with DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=backends,
                    policy="cascade:0.99") as dr:
        ledger = len(dr.store.ledger_entries())             # the model activations
        # the cheap call finishes (and would escalate); the escalation is stopped at its first word
        with pytest.raises(GenerationCancelled) as e:
            dr.complete(Q, options=GenOptions(logprobs=True), cancel=lambda: bool(backends["tactical"].calls))
        assert len(backends["sensory"].calls) == 1 and e.value.tier == "tactical"
        assert e.value.completion_tokens == 0 and e.value.atp > 0
        assert dr.store.count_experiences() == 0 and len(dr.store.ledger_entries()) == ledger
        assert dr.pacer.spent == pytest.approx(e.value.atp)
        (tier, tokens, atp, _), = cancelled_rows(tmp_path / "s.db")
        assert tier == "tactical" and atp == pytest.approx(e.value.atp)
        ans = dr.complete(Q)                                    # the engine is usable at once
        assert ans.escalated and dr.store.count_experiences() == len(ans.calls)
