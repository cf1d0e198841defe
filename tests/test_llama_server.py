"""A real remote tier: llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) on loopback
with the sensory GGUF, used as a dreamroute tier (``backend: openai``) through OpenAIBackend,
DreamRoute and the server app.

Covered: chat text and usage against the server's own answers, streaming (SSE, ``on_text``),
logprobs and top_logprobs, errors (a wrong API key, a prompt longer than the context, a request
the server cannot validate), a tier ``timeout_s`` shorter than the generation (failed call, fallback),
a stream cut short by a second request (llama_cpp.server's ``interrupt_requests``), the upstream
killed mid-request, and prompt scoring for surprise: this server's echoed prompt logprobs are one
token early for a model that adds no BOS token (SmolLM2), which the backend detects, so surprise
falls back to missing.

One server at a time, one thread (``--n_threads 1``): the machine is shared. Skipped without
llama-cpp-python, its server's extras (``pip install -e '.[llama-server]'``) or the sensory GGUF;
marked ``model`` (tests/conftest.py's native gate fails them with the cause where llama.cpp crashes).
"""

from __future__ import annotations

import importlib.util
import math
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from dreamroute import DreamRoute
from dreamroute.backends.openai_http import OpenAIBackend
from dreamroute.backends.openai_score import _echo_shift
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import ServerConfig, Settings, TierConfig, default_tiers
from dreamroute.errors import BackendError, ModelFileError
from dreamroute.server import create_app

pytestmark = pytest.mark.model

API_KEY = "test-key"
ALIAS = "smollm2"
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
# hundreds of tokens: a sequence already begun, which the model continues to max_tokens on every build
# seen ("Count from 1 to 500" alone ended after ~120 tokens, or with a short list of dates, on an
# AVX-512 host, finishing before the timeouts and kills these tests need to land mid-answer)
LONG = [{"role": "user", "content": "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"}]
TOO_LONG = [{"role": "user", "content": "word " * 3000}]                            # > n_ctx 2048
README = Path(__file__).resolve().parents[1] / "README.md"


# ----------------------------------------------------------------------------- the server

def _gguf() -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh)")
    for mod in ("sse_starlette", "starlette_context", "fastapi", "uvicorn", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"llama_cpp.server needs {mod}: pip install -e '.[llama-server]'")
    from dreamroute.backends.registry import resolve_model
    try:
        return resolve_model(default_tiers()[0].source, Path(tempfile.gettempdir()) / "dreamroute-test-models")
    except ModelFileError as e:
        pytest.skip(f"sensory GGUF cannot be resolved: {e}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on loopback with its defaults (as a user starts it), one thread,
    an API key and the model alias ``smollm2``; restarted on the same port after a kill."""

    def __init__(self, gguf: Path, log: Path):
        self.gguf, self.log = gguf, log
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
               "--n_threads", "1", "--n_threads_batch", "1", "--api_key", API_KEY]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", headers=auth(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"llama_cpp.server did not answer /v1/models within 180 s:\n{self.tail()}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-request, without closing anything."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LlamaServer(_gguf(), tmp_path_factory.mktemp("llama-server") / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def live(server) -> LlamaServer:
    """The server, started again when an earlier test killed it."""
    if not server.alive():
        server.start()
    return server


def remote_tier(srv: LlamaServer, **kw) -> TierConfig:
    return TierConfig(**{"name": "sensory", "model": "SmolLM2-135M (llama_cpp.server)", "backend": "openai",
                         "base_url": srv.base_url, "api_key": API_KEY, "remote_model": ALIAS,
                         "params_b": 0.135, **kw})


def direct(srv: LlamaServer, path: str, body: dict) -> dict:
    """The server's own answer to ``body`` (no dreamroute in between)."""
    r = httpx.post(f"{srv.base_url}{path}", json={"model": ALIAS, **body}, headers=auth(), timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def generate_in_thread(b: OpenAIBackend, messages, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["gen"] = b.generate(messages, **kw)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ----------------------------------------------------------------------------- OpenAIBackend

def test_chat_text_and_usage_match_the_servers_own_answer(live):
    want = direct(live, "/chat/completions", {"messages": COUNT, "max_tokens": 24, "temperature": 0, "seed": 0})
    b = OpenAIBackend(remote_tier(live))
    g = b.generate(COUNT, max_tokens=24)                       # streamed: this server sends no usage in a stream
    assert g.text == want["choices"][0]["message"]["content"] and g.text.startswith("1, 2, 3")
    assert g.finish_reason == want["choices"][0]["finish_reason"] == "length"
    assert g.extra["streamed"] and g.extra["usage_estimated"]
    assert g.completion_tokens == len(g.token_logprobs) == want["usage"]["completion_tokens"] == 24
    # the prompt estimate is corrected once by the template's tokens, from one unstreamed max_tokens 1 request
    assert g.prompt_tokens == want["usage"]["prompt_tokens"] and g.extra["prompt_offset"] > 0
    other = b.generate([{"role": "user", "content": "Name three colours of the rainbow, please."}], max_tokens=2)
    n = direct(live, "/chat/completions", {"messages": [{"role": "user", "content": "Name three colours of the "
                                           "rainbow, please."}], "max_tokens": 1})["usage"]["prompt_tokens"]
    assert abs(other.prompt_tokens - n) <= n // 5       # another chat: within 20 % (uncorrected: 3 times fewer)
    assert g.model == f"{live.base_url}#{ALIAS}" and 0 < g.prefill_s and 0 < g.decode_s
    assert all(v <= 0 and math.isfinite(v) for v in g.token_logprobs) and g.mean_logprob is not None
    b._stream_ok = False                                        # the same tier without streaming: exact usage
    p = b.generate(COUNT, max_tokens=24)
    assert p.text == g.text and not p.extra["streamed"] and "usage_estimated" not in p.extra
    assert (p.prompt_tokens, p.completion_tokens) == (want["usage"]["prompt_tokens"], 24)
    assert p.token_logprobs == pytest.approx(g.token_logprobs, abs=1e-4)


def test_streaming_hands_out_text_as_it_arrives(live):
    pieces: list[tuple[float, str]] = []
    b = OpenAIBackend(remote_tier(live, logprobs=False))
    t0 = time.perf_counter()
    g = b.generate(COUNT, max_tokens=30, on_text=lambda s: pieces.append((time.perf_counter(), s)))
    end = time.perf_counter()
    assert "".join(s for _, s in pieces) == g.text and len(pieces) > 5
    assert pieces[0][0] - t0 < (end - t0) * 0.8                # the first text came well before the end
    assert g.token_logprobs is None                             # tier logprobs: false


def test_logprobs_and_top_logprobs_in_openai_layout(live):
    b = OpenAIBackend(remote_tier(live))
    want = direct(live, "/chat/completions", {"messages": COUNT, "max_tokens": 12, "temperature": 0, "seed": 0,
                                              "logprobs": True, "top_logprobs": 3})["choices"][0]["logprobs"]["content"]
    for k in (0, 3):
        g = b.generate(COUNT, max_tokens=12, logprobs=True, top_logprobs=k)
        d = g.token_details
        assert d is not None and len(d) == g.completion_tokens == 12
        assert b"".join(t.bytes for t in d) == g.text.encode()          # bytes from the token text (it sends null)
        assert [t.logprob for t in d] == pytest.approx([x["logprob"] for x in want], abs=1e-4)
        for t in d:
            tops = [a.logprob for a in t.top_logprobs]
            assert len(tops) == k and tops == sorted(tops, reverse=True)
    assert b.generate(COUNT, max_tokens=12).token_details is None


def test_upstream_errors_carry_its_message_and_change_nothing(live):
    with pytest.raises(BackendError) as e:                      # a wrong API key: 401 from the upstream
        OpenAIBackend(remote_tier(live, api_key="wrong")).generate(COUNT, max_tokens=4)
    assert e.value.status == 401 and "Invalid API key" in str(e.value) and not e.value.overloaded
    b = OpenAIBackend(remote_tier(live))
    with pytest.raises(BackendError) as e:                      # this server raises it inside the stream
        b.generate(TOO_LONG, max_tokens=4)
    assert e.value.status == 400 and "maximum context length is 2048 tokens" in str(e.value)
    with pytest.raises(BackendError) as e:                      # a request it cannot validate: its 500
        b.generate([{"role": "robot", "content": "hi"}], max_tokens=4)
    assert e.value.status == 500 and "validation error" in str(e.value)
    g = b.generate(COUNT, max_tokens=6)                         # streaming and logprobs stay on
    assert g.extra["streamed"] and g.token_logprobs is not None and g.text.startswith("1,")


def test_a_timeout_shorter_than_the_generation_fails_the_call(live):
    b = OpenAIBackend(remote_tier(live, timeout_s=1.5))
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"did not finish the answer within 1\.5 s"):
        b.generate(LONG, max_tokens=400)
    assert time.perf_counter() - t0 < 4.0
    assert OpenAIBackend(remote_tier(live)).generate(COUNT, max_tokens=6).text.startswith("1,")  # it carries on


def test_a_stream_cut_short_by_another_request_is_an_error_not_a_shorter_answer(live):
    """llama_cpp.server answers one request at a time and, by default (``interrupt_requests``),
    ends a running stream as soon as another request waits: the first call fails, it never comes
    back as a complete-looking short answer (README: ``max_in_flight: 1`` for this server)."""
    b = OpenAIBackend(remote_tier(live, logprobs=False))
    t, out = generate_in_thread(b, LONG, max_tokens=300)
    time.sleep(1.5)
    second = b.generate(COUNT, max_tokens=6)
    t.join(60)
    assert second.text.startswith("1,")
    assert "gen" not in out and isinstance(out["error"], BackendError)
    assert re.search(r"cut the answer short|broke off", str(out["error"])), out["error"]


def test_max_in_flight_1_keeps_concurrent_requests_from_cutting_each_other_short(live, tmp_path):
    """The README's advice for this server: one call at a time on the tier, the rest queued."""
    settings, dr = hierarchy(live, tmp_path, logprobs=False, max_in_flight=1)
    out: dict = {}

    def ask(i):
        try:
            out[i] = dr.complete(COUNT, max_tokens=40, tier="sensory").text
        except Exception as e:  # noqa: BLE001 - the test looks at it
            out[i] = e
    with dr:
        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(3)]
        threads[0].start()
        time.sleep(0.7)                          # the first is streaming its answer when the others come
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(120)
    assert all(isinstance(v, str) and v.startswith("1, 2, 3") for v in out.values()) and len(out) == 3, out


def test_prompt_scoring_is_detected_as_shifted_so_surprise_is_missing(live):
    """/v1/completions with ``echo`` + ``logprobs`` returns prompt logprobs, but llama-cpp-python reads
    token i's from the logits row that predicts token i + 1 when the model adds no BOS token
    (SmolLM2's GGUF: tokenizer.ggml.add_bos_token false). Checked against llama.cpp in process;
    the backend detects it and score() raises (surprise missing), once asking, then at once."""
    from llama_cpp import Llama

    text = "The ferry left the harbour at dawn with crates of apples for the island market."
    echo = direct(live, "/completions", {"prompt": text, "echo": True, "logprobs": 1, "max_tokens": 1,
                                         "temperature": 0})["choices"][0]["logprobs"]
    ref = Llama(str(live.gguf), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    try:
        toks = ref.tokenize(text.encode(), add_bos=False, special=True)
        ref.eval(toks)
        rows = Llama.logits_to_logprobs(ref.scores[:len(toks)])
    finally:
        ref.close()
    n = len(toks)
    got = echo["token_logprobs"][1:n]
    shifted = [float(rows[i, toks[i]]) for i in range(1, n)]       # row i predicts token i + 1
    right = [float(rows[i - 1, toks[i]]) for i in range(1, n)]
    assert got == pytest.approx(shifted, abs=0.05) and got != pytest.approx(right, abs=0.5)
    assert _echo_shift(echo["tokens"], echo["top_logprobs"]) in (True, None)   # None: the probe decides
    # the same prompt laid out as it should be is told apart from it
    top_right = [None] + [{echo["tokens"][i]: right[i - 1]} for i in range(1, n)]
    assert not _echo_shift(echo["tokens"][:n], top_right)

    asked: list[str] = []
    client = httpx.Client(event_hooks={"request": [lambda r: asked.append(r.url.path)]})
    b = OpenAIBackend(remote_tier(live), client=client)
    with pytest.raises(BackendError, match="server does not return prompt logprobs.*one token|next token"):
        b.score([{"role": "user", "content": text}])
    assert "/v1/completions" in asked and "/tokenize" in asked       # vLLM's /tokenize: absent here, not asked again
    n_asked = len(asked)
    with pytest.raises(BackendError, match="server does not return prompt logprobs"):
        b.score([{"role": "user", "content": "Another prompt."}])
    assert len(asked) == n_asked


# ----------------------------------------------------------------------------- DreamRoute, the server app

def hierarchy(srv: LlamaServer, tmp_path, *, policy="cascade:0", cooldown_s=60.0, server=None, n_ctx=2048,
              **tier_kw):
    """sensory: the real remote tier; tactical: a scripted tier to fall back to."""
    tiers = [remote_tier(srv, n_ctx=n_ctx, **tier_kw),
             TierConfig(name="tactical", model="scripted-tactical", backend="scripted", params_b=0.5, n_ctx=n_ctx)]
    settings = Settings(tiers=tiers, data_dir=tmp_path, server=server or ServerConfig())
    backends = {"sensory": OpenAIBackend(tiers[0]),
                "tactical": ScriptedBackend("sha-tactical", lambda m: "tactical: The answer is 4.")}
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy=policy, cooldown_s=cooldown_s)
    return settings, dr


def answers_of(dr: DreamRoute, tier: str) -> int:
    return sum(1 for e in dr.store.experiences(["tier"]) if e["tier"] == tier)


def test_dreamroute_answers_on_the_remote_tier_with_surprise_missing(live, tmp_path):
    want = direct(live, "/chat/completions", {"messages": COUNT, "max_tokens": 16, "temperature": 0, "seed": 0})
    settings, dr = hierarchy(live, tmp_path, policy="dreamroute")
    with dr:
        a = dr.complete(COUNT, max_tokens=16, tier="sensory")
        assert a.tier == "sensory" and a.text == want["choices"][0]["message"]["content"]
        assert a.calls[-1].generation.completion_tokens == 16 and a.atp > 0
        assert answers_of(dr, "sensory") == 1
        a = dr.complete("What is the capital of France?", max_tokens=8)   # routed: surprise under sensory
        assert dr.backends["sensory"]._score_problem is not None       # score() fell back ...
        assert a.decision.signals.surprise is None                      # ... so surprise is missing, not zero
        assert not a.failures and dr.engine.cooldown.cooling("sensory") == 0   # and that is no failure


def test_server_app_chat_stream_logprobs_and_a_too_long_prompt(live, tmp_path):
    want = direct(live, "/chat/completions", {"messages": COUNT, "max_tokens": 16, "temperature": 0, "seed": 0})
    text = want["choices"][0]["message"]["content"]
    settings, dr = hierarchy(live, tmp_path)
    with TestClient(create_app(settings, dr=dr)) as c:
        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": COUNT, "max_tokens": 16})
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["message"]["content"] == text
        assert body["usage"]["completion_tokens"] == 16 and body["usage"]["prompt_tokens"] > 0

        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": COUNT, "max_tokens": 16,
                                                 "stream": True})
        events = [line[5:].strip() for line in r.text.splitlines() if line.startswith("data:")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        import json
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join((ch["choices"][0].get("delta") or {}).get("content") or ""
                       for ch in chunks if ch.get("choices")) == text

        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": COUNT, "max_tokens": 8,
                                                 "logprobs": True, "top_logprobs": 2})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert r.status_code == 200 and len(content) == 8
        assert all(len(t["top_logprobs"]) == 2 and isinstance(t["bytes"], list) for t in content)

        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": TOO_LONG, "max_tokens": 4})
        err = r.json()["error"]                 # dreamroute's own check against the tier's n_ctx comes first
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
    settings, dr = hierarchy(live, tmp_path / "2", n_ctx=8192)   # tiers that claim more than the server has
    with TestClient(create_app(settings, dr=dr)) as c:
        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": TOO_LONG, "max_tokens": 4})
        err = r.json()["error"]                       # then the upstream's 400, named: the client's to fix
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert "HTTP 400" in err["message"] and "maximum context length is 2048 tokens" in err["message"]
        assert dr.engine.cooldown.cooling("sensory") == 0              # one bad request takes no tier away


def test_tier_timeout_is_a_failed_call_that_falls_back(live, tmp_path):
    settings, dr = hierarchy(live, tmp_path, timeout_s=1.5, logprobs=False)
    with dr:
        t0 = time.perf_counter()
        a = dr.complete(LONG, max_tokens=400)                      # cascade:0 picks sensory first
        assert time.perf_counter() - t0 < 5.0
        assert a.tier == "tactical" and [f.tier for f in a.failures] == ["sensory"]
        assert "did not finish the answer within 1.5 s" in a.failures[0].error
        assert dr.engine.cooldown.cooling("sensory") > 0 and answers_of(dr, "sensory") == 0


def test_upstream_killed_mid_stream_fails_the_call_cleanly(live):
    b = OpenAIBackend(remote_tier(live, logprobs=False))
    streaming = threading.Event()
    t, out = generate_in_thread(b, LONG, max_tokens=400, on_text=lambda piece: streaming.set())
    assert streaming.wait(60), out                                  # killed once the first text has arrived
    live.kill()
    t.join(30)
    assert "gen" not in out and isinstance(out["error"], BackendError), out
    assert re.search(r"broke off after \d+ chunks|cannot reach", str(out["error"])), out["error"]
    with pytest.raises(BackendError, match="cannot reach"):
        b.generate(COUNT, max_tokens=4)


def test_upstream_killed_mid_request_through_the_server_falls_back_and_cools_the_tier(live, tmp_path):
    settings, dr = hierarchy(live, tmp_path, logprobs=False)
    with TestClient(create_app(settings, dr=dr)) as c:
        out: dict = {}

        def ask():
            out["r"] = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": LONG,
                                                            "max_tokens": 400})
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        time.sleep(2.0)
        live.kill()
        t.join(60)
        r = out["r"]
        info = r.json()["dreamroute"]
        assert r.status_code == 200 and info["tier"] == "tactical"
        assert [f["tier"] for f in info["failed_tiers"]] == ["sensory"]
        assert answers_of(dr, "sensory") == 0                      # nothing of the killed call is an answer
        r = c.post("/v1/chat/completions", json={"model": "sensory", "messages": COUNT, "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "tier_unavailable"   # cooling down
        assert int(r.headers["retry-after"]) > 0


# ----------------------------------------------------------------------------- README

def test_readme_remote_tier_examples_are_valid_tiers():
    section = README.read_text().split("## Remote tiers", 1)[1].split("\n## ", 1)[0]
    configs = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.S)]
    configs = [c for c in configs if "tiers" in c]          # not llama-swap's own config.yaml
    assert len(configs) >= 5
    for config in configs:
        for t in config["tiers"]:
            tier = TierConfig(**t)
            assert tier.backend == "openai" and tier.base_url
