"""The server with real clients: the ``openai`` package in process and over a loopback socket
(uvicorn in a thread), one request at a time while /health stays served, ``dreamroute serve``."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.router.gate import TierGate

from .conftest import TIERS
from .test_server import KEY, Q, make, user


def test_openai_client_in_process(tmp_path):
    c, dr = make(tmp_path, api_key=KEY)
    if not isinstance(c, openai.DefaultHttpxClient.__mro__[1]):   # the TestClient is openai's kind of client
        pytest.skip("this starlette's TestClient is not the HTTP client class openai takes")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=c, max_retries=0)
    res = client.chat.completions.create(model="tactical", messages=user(Q))
    assert res.choices[0].message.content == "tactical says: no, 91 is 7 times 13."
    assert res.model_extra["dreamroute"]["tier"] == "tactical" and res.usage.total_tokens > 0
    parts = list(client.chat.completions.create(model="dreamroute", messages=user("What is 5 + 5?"), stream=True,
                                                stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices).endswith("7 times 13.")
    assert parts[-1].usage.total_tokens > 0
    assert [m.id for m in client.models.list()] == ["dreamroute", *TIERS]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user(Q))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="bad", http_client=c,
                      max_retries=0).models.list()


@contextmanager
def served(app):
    """The app under uvicorn on a free loopback port, in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def test_openai_client_over_a_socket(tmp_path):
    c, dr = make(tmp_path, api_key=KEY)
    with served(c.app) as url, openai.DefaultHttpxClient(trust_env=False) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, http_client=http, max_retries=0)
        res = client.chat.completions.create(model="specialized", messages=user(Q), max_tokens=50)
        assert res.choices[0].message.content.startswith("specialized") and res.id.startswith("chatcmpl-")
        raw = client.chat.completions.with_raw_response.create(model="sensory", messages=user(Q))
        assert raw.headers["x-dreamroute-tier"] == "sensory"
        text = "".join(p.choices[0].delta.content or "" for p in client.chat.completions.create(
            model="dreamroute", messages=user("What is 9 + 9?"), stream=True) if p.choices)
        assert text.endswith("says: no, 91 is 7 times 13.")
        assert http.get(f"{url}/health").json()["status"] == "ok"
    assert dr.store.count_experiences() >= 3 and dr.store.verify_ledger().ok


def test_a_request_waits_for_its_tiers_turn_while_health_and_metrics_stay_served(tmp_path):
    entered, gate = threading.Event(), threading.Event()

    def slow(messages):
        entered.set()
        assert gate.wait(20)
        return "done."
    c, dr = make(tmp_path, {n: ScriptedBackend(f"sha-{n}", slow) for n in TIERS}, request_timeout_s=0.3)
    dr.gates["tactical"] = TierGate("tactical", 1, 4)     # one call at a time, as a llama.cpp tier
    body = {"model": "tactical", "messages": user(Q)}
    with served(c.app) as url:
        results = {}

        def first():
            with httpx.Client(trust_env=False, timeout=30) as h:
                results["first"] = h.post(f"{url}/v1/chat/completions", json=body)
        t = threading.Thread(target=first)
        t.start()
        try:
            assert entered.wait(20)
            with httpx.Client(trust_env=False, timeout=30) as h:
                t0 = time.monotonic()
                assert h.get(f"{url}/health").json()["busy"] is True
                assert h.get(f"{url}/metrics").status_code == 200
                assert time.monotonic() - t0 < 5
                busy = h.post(f"{url}/v1/chat/completions", json={**body, "messages": user("other")})
                assert busy.status_code == 503 and busy.json()["error"]["code"] == "tier_busy"   # waited 0.3 s
                assert int(busy.headers["retry-after"]) >= 1
        finally:
            gate.set()
            t.join(20)
    assert results["first"].status_code == 200 and results["first"].json()["choices"][0]["message"]["content"] == "done."
    assert dr.store.count_experiences() == 1


def test_serve_command_builds_the_app_from_config_and_flags(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from dreamroute.cli import app as cli
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path),
        "tiers": [{"name": "small", "model": "remote-small", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"},
                  {"name": "big", "model": "remote-big", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}],
        "server": {"port": 9999, "max_completion_tokens": 512}}))
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.delenv("DREAMROUTE_SERVER__API_KEY", raising=False)
    r = CliRunner().invoke(cli, ["serve", "--config", str(cfg), "--db", str(tmp_path / "serve.db"), "--port", "8123",
                                 "--budget", "5", "--policy", "cascade:0.7", "--api-key", KEY])
    assert r.exit_code == 0, r.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and seen["workers"] == 1
    st = seen["app"].state.dreamroute
    assert st.settings.server.max_completion_tokens == 512 and st.settings.server.api_key == KEY
    assert st.dr.policy.name == "cascade:0.7" and st.dr.pacer.budget == 5.0 and st.dr.responses is not None
    with TestClient(seen["app"], headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["dreamroute", "small", "big"]
    bad = CliRunner().invoke(cli, ["serve", "--config", str(cfg), "--db", str(tmp_path / "serve.db"),
                                   "--policy", "always:huge"])
    assert bad.exit_code == 2 and "huge" in bad.output


def test_server_config_from_env_and_validation(tmp_path, monkeypatch):
    from dreamroute.config import load_settings
    from dreamroute.errors import ConfigError
    monkeypatch.setenv("DREAMROUTE_SERVER__API_KEY", KEY)
    monkeypatch.setenv("DREAMROUTE_SERVER__PORT", "8111")
    s = load_settings(None)
    assert s.server.api_key == KEY and s.server.port == 8111 and s.max_prompt_tokens == 2048 - 320
    monkeypatch.delenv("DREAMROUTE_SERVER__API_KEY")
    monkeypatch.delenv("DREAMROUTE_SERVER__PORT")
    for bad, match in [({"default_max_tokens": 2000}, "max_completion_tokens"), ({"api_key": " "}, "api_key"),
                       ({"policy": "always:huge"}, "huge"), ({"port": 70000}, "port"),
                       ({"max_request_bytes": 10}, "max_request_bytes"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(ConfigError, match=match):
            load_settings(None, server=bad)
    assert load_settings(None, server={"max_prompt_tokens": 100}).max_prompt_tokens == 100
