"""The OpenAI-compatible server on scripted backends: completions, streaming, feedback, fast path,
bad input, faults, metrics, auth, conversations (the real clients: ``test_server_live.py``)."""

from __future__ import annotations

import json
import sqlite3

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import ServerConfig
from dreamroute.server import create_app, derive_conversation_id

from .conftest import TIERS, scripted_settings
from .test_fallback import Failing

KEY = "sekrit-key"
Q = "Is 91 a prime number? Answer yes or no."


def user(text):
    return [{"role": "user", "content": text}]


def scripted(failing=()):
    return {n: Failing(f"sha-{n}") if n in failing else
            ScriptedBackend(f"sha-{n}", lambda m, n=n: f"{n} says: no, 91 is 7 times 13.") for n in TIERS}


def make(tmp_path, backends=None, *, fast_path=True, cooldown_s=60.0, **server):
    """(TestClient, DreamRoute) over scripted tiers with a store in tmp_path."""
    settings = scripted_settings(tmp_path).model_copy(update={"server": ServerConfig(**server)})
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=backends or scripted(), fast_path=fast_path,
                    cooldown_s=cooldown_s, seed=0)
    headers = {"Authorization": f"Bearer {server['api_key']}"} if server.get("api_key") else {}
    return TestClient(create_app(settings, dr=dr), headers=headers), dr


def stored(dr, db) -> tuple:
    """Everything a request could change on record."""
    con = sqlite3.connect(db)
    try:
        bg = con.execute("SELECT COUNT(*) FROM background_work").fetchone()[0]
        outcomes = con.execute("SELECT GROUP_CONCAT(outcome) FROM experiences").fetchone()[0]
    finally:
        con.close()
    return dr.store.count_experiences(), len(dr.store.ledger_entries()), bg, outcomes, \
        [(r.tier, r.context, r.alpha, r.beta) for r in dr.store.trust_table()]


def ask(c, text=Q, model="tactical", **kw):
    r = c.post("/v1/chat/completions", json={"model": model, "messages": user(text) if isinstance(text, str)
                                             else text, **kw})
    assert r.status_code == 200, r.text
    return r


def sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_routed_and_per_tier(tmp_path):
    c, dr = make(tmp_path)
    r = ask(c, model="dreamroute")
    body = r.json()
    info = body["dreamroute"]
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-" + info["request_id"]
    assert body["model"] == "dreamroute" and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": f"{info['tier']} says: no, 91 is 7 times 13."}
    assert set(info) >= {"tier", "context", "atp_joules", "fast_path", "kv_restored", "escalated", "audited"}
    assert info["tier"] in TIERS and info["context"] == "novel" and info["atp_joules"] > 0 and not info["fast_path"]
    assert r.headers["x-dreamroute-tier"] == info["tier"] and r.headers["x-dreamroute-context"] == "novel"
    assert float(r.headers["x-dreamroute-atp"]) == pytest.approx(info["atp_joules"], abs=1e-4)
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] >= 8
    # the request's ATP: every call, plus surprise scoring (stored with the first call)
    surprise = dr.store.experiences(["atp_joules"])[0]["atp_joules"] - info["calls"][0]["atp_joules"]
    assert surprise > 0 and info["atp_joules"] == pytest.approx(sum(x["atp_joules"] for x in info["calls"]) + surprise)
    for t in TIERS:
        info = ask(c, model=t, max_tokens=3).json()
        assert info["dreamroute"]["tier"] == t and not info["dreamroute"]["escalated"]
        assert not info["dreamroute"]["audited"] and info["choices"][0]["finish_reason"] == "length"
        assert info["choices"][0]["message"]["content"] == f"{t} says: no,"
    assert [r["tier"] for r in dr.store.experiences(["tier", "role"]) if r["role"] == "chosen"][-3:] == list(TIERS)
    models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["dreamroute", *TIERS] and models["object"] == "list"


def test_streaming_chunks_join_to_the_answer(tmp_path):
    c, dr = make(tmp_path)
    full = ask(c, "What is 2 + 2?").json()
    r = c.post("/v1/chat/completions", json={"model": "tactical", "messages": user("What is 3 + 3?"),
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-dreamroute-tier"] == "tactical"
    chunks = sse(r.text)
    assert {ch["object"] for ch in chunks} == {"chat.completion.chunk"} and len({ch["id"] for ch in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == full["choices"][0]["message"]["content"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["dreamroute"]["tier"] == "tactical"
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0
    assert chunks[0]["id"] == "chatcmpl-" + last["dreamroute"]["request_id"]
    plain = sse(c.post("/v1/chat/completions", json={"model": "sensory", "stream": True,
                                                     "messages": user("hi there")}).text)
    assert all("usage" not in ch for ch in plain) and plain[-1]["choices"][0]["finish_reason"] == "stop"
    assert dr.store.count_experiences() == 3


def test_bad_input_gets_the_right_status_and_changes_nothing(tmp_path):
    c, dr = make(tmp_path, api_key=KEY, max_request_bytes=4096, max_prompt_tokens=40)
    rid = ask(c).json()["dreamroute"]["request_id"]
    before = stored(dr, tmp_path / "s.db")
    ok_body = {"model": "dreamroute", "messages": user("hello")}
    cases = [
        (dict(content=b'{"model": "dreamroute", "messages": [', headers={"content-type": "application/json"}), 400, None),
        (dict(content=b"not json at all"), 400, None),
        (dict(json={"model": "dreamroute"}), 400, None),
        (dict(json={"model": "dreamroute", "messages": []}), 400, None),
        (dict(json={"model": "dreamroute", "messages": [{"role": "tool", "content": "x"}]}), 400, None),
        (dict(json={"model": "dreamroute", "messages": [{"role": "system", "content": "only a system prompt"}]}), 400, None),
        (dict(json={**ok_body, "temperature": 7}), 400, None),
        (dict(json={**ok_body, "max_tokens": 5000}), 400, None),
        (dict(json={**ok_body, "priority": 2}), 400, None),
        (dict(json=ok_body, headers={"x-dreamroute-priority": "high"}), 400, None),
        (dict(json={"model": "gpt-4o", "messages": user("hi")}), 404, "model_not_found"),
        (dict(json={**ok_body, "messages": user("word " * 2000)}), 413, "request_too_large"),
        (dict(content=iter([json.dumps({**ok_body, "messages": user("word " * 2000)}).encode()]),
              headers={"content-type": "application/json"}), 413, "request_too_large"),   # chunked, no length
        (dict(json={**ok_body, "messages": user("word " * 60)}), 400, "context_length_exceeded"),
        (dict(json=ok_body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"),
        (dict(json=ok_body, headers={"Authorization": ""}), 401, "invalid_api_key"),
    ]
    for kw, status, code in cases:
        r = c.post("/v1/chat/completions", **kw)
        assert r.status_code == status, (kw, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
        assert err["type"] == "invalid_request_error"
    feedback_cases = [({"id": "chatcmpl-nope", "outcome": "success"}, 404, "response_not_found"),
                      ({"id": rid, "rating": 1.5}, 400, None), ({"id": rid, "rating": -0.1}, 400, None),
                      ({"id": rid, "outcome": "great"}, 400, None), ({"id": rid}, 400, None),
                      ({"id": rid, "outcome": "success", "rating": 1.0}, 400, None)]
    for body, status, code in feedback_cases:
        r = c.post("/v1/feedback", json=body)
        assert r.status_code == status and r.json()["error"]["code"] == code, (body, r.text)
    r = c.post("/v1/feedback", content=b'{"id": "x", "rating": NaN}', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert c.get("/v1/nothing").status_code == 404 and c.get("/v1/chat/completions").status_code == 405
    assert stored(dr, tmp_path / "s.db") == before and dr.store.verify_ledger().ok
    assert c.post("/v1/chat/completions", json=ok_body).status_code == 200   # the key itself works
    errors = {s.labels["type"]: s.value for f in text_string_to_metric_families(c.get("/metrics").text)
              for s in f.samples if s.name == "dreamroute_errors_total"}
    assert errors["invalid_api_key"] == 2 and errors["request_too_large"] == 2 and errors["model_not_found"] == 1


def test_context_length_against_n_ctx(tmp_path):
    c, dr = make(tmp_path)   # n_ctx 2048, derived prompt limit 2048 - 320
    r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": user("w " * 1500), "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048" in r.json()["error"]["message"]
    assert ask(c, "w " * 1500, model="sensory", max_tokens=100).status_code == 200


def test_feedback_updates_trust_and_ledger(tmp_path):
    c, dr = make(tmp_path)
    a = ask(c).json()
    n_ledger = len(dr.store.ledger_entries())
    r = c.post("/v1/feedback", json={"id": a["id"], "outcome": "success"})
    assert r.status_code == 200
    fb = r.json()
    assert fb["outcome"] == "success" and fb["witness"] == "user:api" and fb["tier"] == "tactical"
    assert fb["trust_after"] > fb["trust_before"] == 0.5
    entries = dr.store.ledger_entries()
    assert len(entries) == n_ledger + 1 and entries[-1]["witnesses"] == ["user:api"]
    assert entries[-1]["action"] == "trust.update" and dr.store.verify_ledger().ok
    b = ask(c, "What is 1 + 1?").json()
    fb2 = c.post("/v1/feedback", json={"id": b["dreamroute"]["request_id"], "rating": 0.2}).json()
    assert fb2["outcome"] == "failure" and fb2["reward"] == 0.2
    trust = c.get("/v1/trust").json()
    assert {(t["tier"], t["context"]) for t in trust["trust"]} >= {("tactical", fb["context"])}
    assert trust["metabolic"]["state"] == "WAKE" and trust["requests"] == {"served": 2, "routed": 2, "fast_path": 0}
    assert set(trust["pacer"]) >= {"lambda", "budget_joules", "atp_spent_joules", "routed_requests"}
    assert dr.store.verify_ledger().ok


def test_fast_path(tmp_path):
    c, dr = make(tmp_path)
    first = ask(c).json()
    assert not ask(c).json()["dreamroute"]["fast_path"]          # no witnessed success yet
    assert c.post("/v1/feedback", json={"id": first["id"], "outcome": "success"}).status_code == 200
    n = stored(dr, tmp_path / "s.db")
    r = ask(c, Q, model="dreamroute")                             # the exact repeat
    hit = r.json()
    assert hit["dreamroute"]["fast_path"] and hit["dreamroute"]["atp_joules"] == 0.0
    assert hit["dreamroute"]["cached_from"] == first["dreamroute"]["request_id"] and hit["id"] != first["id"]
    assert hit["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert r.headers["x-dreamroute-fast-path"] == "1" and r.headers["x-dreamroute-atp"] == "0.0000"
    assert stored(dr, tmp_path / "s.db") == n                     # a hit stores nothing
    stream = sse(c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": user(Q),
                                                      "stream": True}).text)
    assert stream[-1]["dreamroute"]["fast_path"]
    for other in ["  Is 91 a prime   number?\nAnswer yes or no. ",    # whitespace can change an answer
                  "Is 91 not a prime number? Answer yes or no.",      # negated
                  "Answer yes or no. Is 91 a prime number?",          # reordered
                  "Is 91 a Prime number? Answer yes or no.",          # case can change a question
                  [{"role": "system", "content": "Answer in French."}, *user(Q)]]:
        assert not ask(c, other, model="dreamroute").json()["dreamroute"]["fast_path"], other
    assert not ask(c, model="sensory").json()["dreamroute"]["fast_path"]  # a forced tier: its own answers only
    assert ask(c, model="tactical").json()["dreamroute"]["fast_path"]
    families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert families["dreamroute_fast_path_hits"].samples[0].value == 3
    trust = c.get("/v1/trust").json()
    assert trust["requests"]["fast_path"] == 3 and trust["requests"]["served"] == trust["requests"]["routed"] + 3
    # failure reported on a hit reaches the answer it served, and removes it
    fb = c.post("/v1/feedback", json={"id": hit["id"], "outcome": "failure"}).json()
    assert fb["request_id"] == first["dreamroute"]["request_id"] and fb["outcome"] == "failure"
    assert not ask(c, model="dreamroute").json()["dreamroute"]["fast_path"]
    assert dr.store.verify_ledger().ok


def test_fast_path_off(tmp_path):
    c, dr = make(tmp_path, fast_path=False)
    a = ask(c).json()
    c.post("/v1/feedback", json={"id": a["id"], "outcome": "success"})
    assert not ask(c).json()["dreamroute"]["fast_path"]


def test_backend_failure_is_reported_and_cools_down(tmp_path):
    c, dr = make(tmp_path, scripted(failing={"tactical"}))
    r = c.post("/v1/chat/completions", json={"model": "tactical", "messages": user(Q)})
    err = r.json()["error"]   # a named tier is never answered by another one (tests/test_faults.py)
    assert r.status_code == 502 and err["code"] == "tier_failed" and "tactical" in err["message"]
    assert "model crashed" in err["message"] and "x-dreamroute-tier" not in r.headers
    assert c.get("/v1/trust").json()["cooldown"].keys() == {"tactical"}
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert [(s.labels["tier"], s.value) for s in fams["dreamroute_backend_failures"].samples
            if s.name.endswith("_total")] == [("tactical", 1.0)]
    cooling = {s.labels["tier"]: s.value for s in fams["dreamroute_tier_cooling"].samples}
    assert cooling == {"sensory": 0.0, "tactical": 1.0, "specialized": 0.0}
    c2, dr2 = make(tmp_path / "all", scripted(failing=set(TIERS)))
    r = c2.post("/v1/chat/completions", json={"model": "dreamroute", "messages": user(Q)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    assert dr2.store.count_experiences() == 0


def test_metrics_parse(tmp_path):
    c, dr = make(tmp_path)
    a = ask(c).json()
    c.post("/v1/feedback", json={"id": a["id"], "outcome": "success"})
    ask(c, model="sensory")
    c.post("/v1/chat/completions", json={"model": "nope", "messages": user("x")})
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert {"dreamroute_requests", "dreamroute_atp_joules", "dreamroute_request_latency_seconds",
            "dreamroute_fast_path_hits", "dreamroute_escalations", "dreamroute_audits", "dreamroute_errors",
            "dreamroute_trust", "dreamroute_lambda", "dreamroute_backend_failures"} <= set(fams)
    req = {(s.labels["tier"], s.labels["status"]): s.value for s in fams["dreamroute_requests"].samples
           if s.name.endswith("_total")}
    assert req[("tactical", "200")] == 1 and req[("sensory", "200")] == 1 and req[("none", "404")] == 1
    atp = {s.labels["tier"]: s.value for s in fams["dreamroute_atp_joules"].samples if s.name.endswith("_total")}
    assert atp["tactical"] == pytest.approx(a["dreamroute"]["atp_joules"])
    trust = {(s.labels["tier"], s.labels["context"]): s.value for s in fams["dreamroute_trust"].samples}
    assert trust[("tactical", a["dreamroute"]["context"])] == pytest.approx(2 / 3)
    counts = {s.labels["path"]: s.value for s in fams["dreamroute_request_latency_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"forced": 2}


def test_auth_spares_only_health(tmp_path):
    c, dr = make(tmp_path, api_key=KEY)
    bare = TestClient(c.app)
    for path in ("/v1/models", "/v1/trust", "/metrics"):
        assert bare.get(path).status_code == 401 and c.get(path).status_code == 200
    h = bare.get("/health").json()
    assert h["status"] == "ok" and h["tiers"] == list(TIERS) and h["store"].endswith("s.db")
    assert bare.get("/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_conversation_id_derived_and_kv_reused(tmp_path):
    c, dr = make(tmp_path)
    sys = {"role": "system", "content": "You are terse."}
    t1 = [sys, *user("Name a prime.")]
    assert derive_conversation_id(t1) is None
    a1 = ask(c, t1).json()
    t2 = t1 + [{"role": "assistant", "content": a1["choices"][0]["message"]["content"]}, *user("Another one?")]
    a2 = ask(c, t2).json()
    conv = a2["dreamroute"]["conversation_id"]
    assert conv == derive_conversation_id(t2) and conv.startswith("auto-")
    assert derive_conversation_id(t2, user="alice") != conv
    t3 = t2 + [{"role": "assistant", "content": a2["choices"][0]["message"]["content"]}, *user("And a third?")]
    a3 = ask(c, t3).json()
    assert a3["dreamroute"]["conversation_id"] == conv and a3["dreamroute"]["kv_restored"]
    rows = dr.store.experiences(["conversation_id", "turn"])
    assert [(r["conversation_id"], r["turn"]) for r in rows] == [(None, 0), (conv, 1), (conv, 2)]
    a4 = ask(c, t1, conversation_id="my-chat").json()
    assert a4["dreamroute"]["conversation_id"] == "my-chat"
    r = c.post("/v1/chat/completions", json={"model": "tactical", "messages": t1},
               headers={"x-dreamroute-conversation-id": "hdr-chat", "x-dreamroute-priority": "0.9"})
    assert r.json()["dreamroute"]["conversation_id"] == "hdr-chat"
    assert dr.store.experiences(["priority"])[-1]["priority"] == 0.9



def test_trial_findings_repeat_verdict_surrogates_header_length_and_head(tmp_path):
    c, dr = make(tmp_path)
    a = ask(c).json()
    assert c.post("/v1/feedback", json={"id": a["id"], "outcome": "success"}).status_code == 200
    before = stored(dr, tmp_path / "s.db")
    again = c.post("/v1/feedback", json={"id": a["id"], "rating": 0.9})   # the same verdict again
    assert again.status_code == 409 and again.json()["error"]["code"] == "feedback_exists"
    assert stored(dr, tmp_path / "s.db") == before                       # not counted twice
    both = c.post("/v1/feedback", json={"id": a["id"], "outcome": "success", "rating": 1})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    assert "Value error" not in both.json()["error"]["message"]
    bad = c.post("/v1/chat/completions", content=b'{"model": "tactical", "messages": [{"role": "user", '
                 b'"content": "bad \\ud800 surrogate"}]}', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "Unicode" in bad.json()["error"]["message"]
    long = c.post("/v1/chat/completions", json={"model": "tactical", "messages": user(Q)},
                  headers={"x-dreamroute-conversation-id": "x" * 201})
    assert long.status_code == 400
    for body in ({"model": "tactical", "messages": user(Q), "max_tokens": "8"},
                 {"model": "tactical", "messages": user(Q), "max_tokens": True},
                 {"model": "tactical", "messages": user(Q), "stream": "yes"}):
        assert c.post("/v1/chat/completions", json=body).status_code == 400
    assert stored(dr, tmp_path / "s.db") == before
    assert c.head("/health").status_code == 200
    routed = ask(c, "Another question entirely?", model="dreamroute").json()["dreamroute"]
    assert routed["atp_joules"] == pytest.approx(sum(x["atp_joules"] for x in routed["calls"])
                                                 + routed["surprise_atp_joules"])
