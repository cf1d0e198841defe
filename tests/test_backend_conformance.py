"""One conformance suite over every backend: scripted, OpenAI-compatible HTTP (a fake
in-process server) and llama.cpp on the real ``sensory`` model (marked ``model``)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import httpx
import pytest

from dreamroute.backends import make_backend
from dreamroute.backends.base import Backend, Generation
from dreamroute.backends.llama_logprobs import SCORE_CHUNK
from dreamroute.backends.openai_http import OpenAIBackend
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.bench.calibrate import bench_tier
from dreamroute.config import ModelSource, Settings, TierConfig, default_tiers
from dreamroute.backends.options import json_problem
from dreamroute.errors import BackendError, ConfigError, GenerationCancelled, ModelFileError, OptionError

Q1 = [{"role": "user", "content": "What is the capital of France?"}]
Q2 = [{"role": "system", "content": "Answer briefly."},
      {"role": "user", "content": "Name three colours of the rainbow."}]


# ----------------------------------------------------------------------------- fake server

def _answer(messages: list[dict]) -> list[str]:
    last = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return [w.upper() for w in reversed(last.split())] * 3


def _word_lp(word: str) -> float:
    return -0.05 * (1 + len(word) % 7)


def _token_lp(w: str, i: int, k: int) -> dict:
    """One word's ``logprobs.content`` entry as llama-server sends it: the token with the space
    before it, its bytes, and ``k`` alternatives (the word first, then less likely ones)."""
    tok = (" " if i else "") + w
    lp = _word_lp(w)
    top = [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}]
    rest = 1.0 - math.exp(lp)  # alternatives share what the word leaves, halving each time
    top += [{"token": f"<alt{j}>", "logprob": math.log(rest * 0.5 ** j), "bytes": list(f"<alt{j}>".encode())}
            for j in range(1, k)]
    return {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": top[:k]}


def fake_server(*, stream=True, logprobs=True, usage=True, echo=True, honour_stop=True, log: list | None = None):
    """An OpenAI-compatible server as an httpx handler. Tokens are whitespace words; ``stop``
    (unless ``honour_stop`` is off), ``top_logprobs`` and a JSON ``response_format`` (the answer
    becomes ``{"answer": "<its first word>"}``) are honoured as llama-server does."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        if log is not None:
            log.append((request.url.path, body))
        path = request.url.path
        if path == "/v1/chat/completions":
            if body.get("stream") and not stream:
                return httpx.Response(400, json={"error": "stream not supported"})
            words = _answer(body["messages"])
            if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
                words = ['{"answer":', f'"{words[0]}"}}']
            finish = "stop"
            if len(words) > body.get("max_tokens", 10**9):
                words, finish = words[: body["max_tokens"]], "length"
            stops = body.get("stop") or []
            for n in range(1, len(words) + 1) if stops and honour_stop else ():
                if any(s in " ".join(words[:n]) for s in stops):  # as a model generating word by word
                    words, finish = words[:n], "stop"
                    break
            n_prompt = sum(len(m["content"].split()) for m in body["messages"])
            use = {"prompt_tokens": n_prompt, "completion_tokens": len(words),
                   "total_tokens": n_prompt + len(words),
                   "prompt_tokens_details": {"cached_tokens": 0}}
            text = " ".join(words)
            if stops and honour_stop:
                text = text[:min([text.find(s) for s in stops if s in text] or [len(text)])]
            k = body.get("top_logprobs", 0)
            lp = (lambda w, i: {"content": [_token_lp(w, i, k)]}) if (
                logprobs and body.get("logprobs")) else (lambda w, i: None)
            if body.get("stream"):
                chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
                sent = 0
                for i, w in enumerate(words):
                    piece = ((" " if i else "") + w)[: max(len(text) - sent, 0)]
                    sent += len(piece)
                    chunks.append({"choices": [{"index": 0, "delta": {"content": piece},
                                                "logprobs": lp(w, i), "finish_reason": None}]})
                chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                if usage and (body.get("stream_options") or {}).get("include_usage"):
                    chunks.append({"choices": [], "usage": use})
                sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
            content = [_token_lp(w, i, k) for i, w in enumerate(words)]
            resp = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": {"content": content} if lp("x", 0) else None,
                                 "finish_reason": finish}]}
            if usage:
                resp["usage"] = use
            return httpx.Response(200, json=resp)
        if path == "/v1/completions":
            if not echo:
                return httpx.Response(400, json={"error": "echo is not supported"})
            words = body["prompt"].split()
            lps = [None] + [-(0.5 + 0.1 * (len(w) % 5)) for w in words[1:]]
            return httpx.Response(200, json={
                "choices": [{"text": body["prompt"], "logprobs": {"token_logprobs": lps}}],
                "usage": {"prompt_tokens": len(words), "completion_tokens": 0}})
        return httpx.Response(404, json={"error": f"no route {path}"})

    return handler


def openai_backend(**kw) -> OpenAIBackend:
    tier = TierConfig(name="remote", model="fake-model", backend="openai", base_url="http://fake.test/v1")
    return OpenAIBackend(tier, client=httpx.Client(transport=httpx.MockTransport(fake_server(**kw))))


# ----------------------------------------------------------------------------- fixtures

def _sensory():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh)")
    from dreamroute.backends.llama import LlamaBackend
    from dreamroute.backends.registry import resolve_model

    tier = default_tiers()[0]
    try:
        path = resolve_model(tier.source, Path(tempfile.gettempdir()) / "dreamroute-test-models")
    except ModelFileError as e:
        pytest.skip(f"sensory GGUF cannot be resolved: {e}")
    return LlamaBackend(tier.model_copy(update={"n_threads": 2}), path)


@pytest.fixture(scope="module")
def llama_backend():
    b = _sensory()
    yield b
    b.close()


@pytest.fixture(params=["scripted", "openai", pytest.param("llama", marks=pytest.mark.model)])
def backend(request):
    if request.param == "scripted":
        return ScriptedBackend("scripted-1", _scripted_answer, logprob=lambda tok, i: -0.1 * (1 + i % 3))
    if request.param == "openai":
        return openai_backend()
    return request.getfixturevalue("llama_backend")


def _scripted_answer(messages: list[dict]) -> str:
    """The scripted fixture's answer: the fake server's words, or JSON when the prompt asks for it."""
    if "JSON" in messages[-1]["content"]:
        return '{"answer": "Paris"}'
    return " ".join(_answer(messages))


def _stateful(b) -> bool:
    return not isinstance(b, OpenAIBackend)


# ----------------------------------------------------------------------------- conformance

def test_is_a_backend(backend):
    assert isinstance(backend, Backend)
    assert isinstance(backend.identity, str) and backend.identity


def test_generation_fields_are_consistent(backend):
    for msgs, n in ((Q1, 12), (Q2, 5)):
        g = backend.generate(msgs, max_tokens=n, temperature=0.0)
        assert isinstance(g, Generation) and isinstance(g.text, str)
        assert g.prompt_tokens > 0 and 0 < g.completion_tokens <= n
        assert 0 <= g.cached_tokens <= g.prompt_tokens
        assert g.prefill_s >= 0 and g.decode_s >= 0
        assert g.finish_reason in ("stop", "length")
        assert g.model == backend.identity
        if g.token_logprobs is not None:
            assert len(g.token_logprobs) == g.completion_tokens
            assert all(v <= 0 and math.isfinite(v) for v in g.token_logprobs)
            assert g.mean_logprob is not None


def test_greedy_is_deterministic(backend):
    a = backend.generate(Q2, max_tokens=10)
    b = backend.generate(Q1, max_tokens=10)
    c = backend.generate(Q2, max_tokens=10)
    assert a.text == c.text and a.completion_tokens == c.completion_tokens
    assert b.text != a.text


def test_score_length_and_range(backend):
    g = backend.generate(Q1, max_tokens=4)
    s = backend.score(Q1)
    assert len(s) == g.prompt_tokens - 1
    assert all(v <= 0 and math.isfinite(v) for v in s)
    assert backend.score(Q1) == s


def test_close_then_call_again(backend):
    a = backend.generate(Q1, max_tokens=6)
    backend.close()
    b = backend.generate(Q1, max_tokens=6)
    assert b.text == a.text and b.cached_tokens == 0


def test_score_leaves_the_prompt_cached(backend):
    if not _stateful(backend):
        pytest.skip("a remote server keeps its own cache")
    cold = backend.generate(Q2, max_tokens=3)
    backend.generate(Q1, max_tokens=3)
    backend.score(Q2)
    g = backend.generate(Q2, max_tokens=3)
    assert g.cached_tokens == g.prompt_tokens
    assert g.text == cold.text


def test_save_load_round_trip(backend):
    if not _stateful(backend):
        with pytest.raises(BackendError, match="keeps its own"):
            backend.save_state()
        with pytest.raises(BackendError, match="keeps its own"):
            backend.load_state(b"anything")
        return
    first = backend.generate(Q1, max_tokens=8)
    state = backend.save_state()
    backend.generate(Q2, max_tokens=8)
    backend.load_state(state)
    again = backend.generate(Q1, max_tokens=8)
    assert again.text == first.text
    assert again.cached_tokens >= first.prompt_tokens - 1  # restored KV reused


def test_load_state_checks_identity_and_damage(backend):
    if not _stateful(backend):
        pytest.skip("a remote server keeps its own cache")
    backend.generate(Q1, max_tokens=4)
    state = backend.save_state()
    if isinstance(backend, ScriptedBackend):
        other = ScriptedBackend("scripted-2", lambda m: "x")
    else:
        other = type(backend)(backend.tier.model_copy(update={"source": ModelSource(
            gguf=backend.model_path, sha256="f" * 64)}), backend.model_path)
    with pytest.raises(BackendError, match="saved by"):
        other.load_state(state)
    for bad in (state[:-10], state[: len(state) // 2], state[:8], b""):
        with pytest.raises(BackendError, match="truncated or damaged"):
            backend.load_state(bad)
    flipped = bytearray(state)
    flipped[len(state) // 2] ^= 0x01
    with pytest.raises(BackendError, match="truncated or damaged"):
        backend.load_state(bytes(flipped))


# ----------------------------------------------------------------------------- llama only

@pytest.mark.model
def test_llama_matches_create_chat_completion(llama_backend):
    # both from an empty KV cache: a prompt evaluated as one batch, not one reusing the other's
    # prefix (a 1-token batch takes another kernel path, whose rounding can flip a near-tie of
    # greedy decoding on some CPUs: seen on an AVX2-only AMD EPYC)
    for msgs in (Q1, Q2, [{"role": "user", "content": "Write one sentence about the sea."}]):
        llama_backend.reset()
        g = llama_backend.generate(msgs, max_tokens=40, temperature=0.0)
        llama_backend.reset()
        ref = llama_backend._llm.create_chat_completion(msgs, temperature=0, max_tokens=40)
        assert g.text == ref["choices"][0]["message"]["content"]
        assert g.finish_reason == ref["choices"][0]["finish_reason"]
        assert g.prompt_tokens == ref["usage"]["prompt_tokens"]
        assert g.completion_tokens == ref["usage"]["completion_tokens"]


@pytest.mark.model
def test_llama_logprobs_match_full_logits(llama_backend):
    """score() and generate() logprobs equal those of a logits_all=True model."""
    import numpy as np
    from llama_cpp import Llama

    msgs = [{"role": "user", "content": "Explain why the sky is blue. " * 12}]
    scores = llama_backend.score(msgs)
    tokens = llama_backend.prompt_tokens(msgs)
    g = llama_backend.generate(msgs, max_tokens=12)
    ref = Llama(str(llama_backend.model_path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    try:
        out = ref.create_completion(tokens, max_tokens=12, temperature=0, logprobs=1)
        full = Llama.logits_to_logprobs(ref._scores)
        want = [float(full[i, tokens[i + 1]]) for i in range(len(tokens) - 1)]
        assert len(tokens) > SCORE_CHUNK  # several score chunks
        assert np.allclose(scores, want, atol=1e-3)
        assert out["choices"][0]["text"] == g.text
        assert np.allclose(out["choices"][0]["logprobs"]["token_logprobs"], g.token_logprobs, atol=1e-3)
    finally:
        ref.close()


@pytest.mark.model
def test_llama_score_does_not_depend_on_history(llama_backend):
    """A follow-up turn scored after generating the first one equals a cold score."""
    fresh = type(llama_backend)(llama_backend.tier, llama_backend.model_path)
    try:
        llama_backend.score(Q1)
        g = llama_backend.generate(Q1, max_tokens=20)
        follow = Q1 + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "And Spain?"}]
        assert llama_backend.score(follow) == pytest.approx(fresh.score(follow), abs=1e-4)
    finally:
        fresh.close()


@pytest.mark.model
def test_llama_prompt_longer_than_n_ctx(llama_backend):
    with pytest.raises(BackendError, match="raise n_ctx in the tier config"):
        llama_backend.generate([{"role": "user", "content": "word " * 3000}], max_tokens=2)


# ----------------------------------------------------------------------------- openai only

def test_openai_falls_back_without_streaming_logprobs_or_usage():
    log: list = []
    tier = TierConfig(name="r", model="m", backend="openai", base_url="http://fake.test/v1")
    b = OpenAIBackend(tier, client=httpx.Client(transport=httpx.MockTransport(
        fake_server(stream=False, logprobs=False, usage=False, log=log))))
    g = b.generate(Q1, max_tokens=5)
    assert g.text and g.token_logprobs is None and g.extra["usage_estimated"]
    assert g.completion_tokens > 0 and g.prompt_tokens > 0
    assert [p for p, body in log] == ["/v1/chat/completions"] * 2
    assert log[0][1]["stream"] is True and "stream" not in log[1][1]
    b.generate(Q1, max_tokens=5)
    assert len(log) == 3  # remembered: no second streaming attempt


def test_openai_streaming_request_shape():
    log: list = []
    b = openai_backend(log=log)
    g = b.generate(Q1, max_tokens=4)
    body = log[0][1]
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["logprobs"]
    assert g.extra["streamed"] and g.finish_reason == "length" and g.completion_tokens == 4
    assert b.identity == "http://fake.test/v1#fake-model"


def test_openai_score_unsupported_and_connection_errors():
    with pytest.raises(BackendError, match="server does not return prompt logprobs"):
        openai_backend(echo=False).score(Q1)

    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    tier = TierConfig(name="r", model="m", backend="openai", base_url="http://127.0.0.1:9/v1")
    b = OpenAIBackend(tier, client=httpx.Client(transport=httpx.MockTransport(down)))
    with pytest.raises(BackendError, match=r"http://127\.0\.0\.1:9/v1/chat/completions"):
        b.generate(Q1)


# ----------------------------------------------------------------------------- factory, bench

def test_make_backend(tmp_path):
    settings = Settings(model_cache=tmp_path)
    with pytest.raises(ConfigError, match="built in code"):
        make_backend(TierConfig(name="s", model="m", backend="scripted"), settings)
    b = make_backend(TierConfig(name="r", model="m", backend="openai", base_url="http://x/v1/"), settings)
    assert isinstance(b, OpenAIBackend) and b.identity == "http://x/v1#m"
    with pytest.raises(ModelFileError):
        make_backend(TierConfig(name="l", model="m", source=ModelSource(gguf=tmp_path / "no.gguf")), settings)


def test_bench_tier_on_scripted_backend():
    b = ScriptedBackend("s", lambda m: "word " * 100, prefill_s_per_token=0.002, decode_s_per_token=0.02)
    tier = TierConfig(name="s", model="scripted", backend="scripted")
    r = bench_tier(b, tier)
    assert {"tier", "model", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "rss_mb",
            "prefill_s_per_token", "decode_s_per_token", "identity"} <= set(r)
    assert r["prefill_s_per_token"] == pytest.approx(0.002)
    assert r["decode_s_per_token"] == pytest.approx(0.02)
    assert r["decode_tok_s"] == pytest.approx(50.0)
    assert 80 <= r["ttft_prompt_tokens"] <= 130 and 300 <= r["prefill_prompt_tokens"] <= 450
    assert r["rss_mb"] > 0


@pytest.mark.model
def test_llama_restored_conversation_gives_the_same_greedy_answer(llama_backend, tmp_path):
    from dreamroute.cache.reality import RealityCache
    from dreamroute.cache.reuse import ConversationKV

    kv = ConversationKV(RealityCache(tmp_path))
    first = [{"role": "user", "content": "Name three rivers in Europe and one fact about each. " * 3}]
    g1 = llama_backend.generate(first, max_tokens=24)
    assert kv.save("sensory", llama_backend, "conv", g1.prompt_tokens) is not None
    follow = first + [{"role": "assistant", "content": g1.text}, {"role": "user", "content": "Which is longest?"}]
    llama_backend.reset()
    cold = llama_backend.generate(follow, max_tokens=24)
    llama_backend.reset()
    r = kv.restore("sensory", llama_backend, "conv", follow)
    assert r.hit and r.source == "disk" and r.tokens >= g1.prompt_tokens
    warm = llama_backend.generate(follow, max_tokens=24)
    assert warm.text == cold.text
    assert warm.cached_tokens >= r.tokens - 1 and cold.cached_tokens == 0
    # a changed earlier turn is a miss, never a wrong answer
    llama_backend.reset()
    changed = [{"role": "user", "content": "Name three lakes in Asia."}] + follow[1:]
    assert not kv.restore("sensory", llama_backend, "conv", changed).hit


@pytest.mark.model
def test_llama_score_new_only_is_the_tail_of_score(llama_backend, tmp_path):
    import numpy as np
    from dreamroute.cache.reality import RealityCache
    from dreamroute.cache.reuse import ConversationKV

    first = [{"role": "user", "content": "The ferry left for the island with crates of apples. " * 6}]
    llama_backend.reset()
    g = llama_backend.generate(first, max_tokens=8)
    assert ConversationKV(RealityCache(tmp_path)).save("sensory", llama_backend, "c", g.prompt_tokens) >= 2
    follow = first + [{"role": "assistant", "content": g.text}, {"role": "user", "content": "What did it carry?"}]
    n = len(llama_backend.prompt_tokens(follow))
    new = llama_backend.score(follow, new_only=True)
    llama_backend.reset()
    full = llama_backend.score(follow)
    assert 0 < len(new) < n - 1 and len(full) == n - 1
    assert np.allclose(new, full[-len(new):], atol=1e-3)   # a settled state scores as a cold prefill


# ----------------------------------------------------------------------------- generation options

QJ = [{"role": "user", "content": "Reply in JSON with one key, answer: what is the capital of France?"}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "maxLength": 24}},
    "required": ["answer"], "additionalProperties": False}}}


def incremental_cut(pieces: list[bytes], stops: list[str]) -> tuple[str, int]:
    """(text, tokens generated) of a generation of ``pieces`` under ``stops``, as a model generates:
    it ends at the first token after which the text holds a stop string, before that string's
    earliest start (llama-cpp-python's and OpenAI's rule)."""
    text, raw = b"", [s.encode() for s in stops]
    for n, p in enumerate(pieces, 1):
        text += p
        found = [text.find(s) for s in raw if s in text]
        if found:
            return text[:min(found)].decode("utf-8", errors="ignore"), n
    return text.decode("utf-8", errors="ignore"), len(pieces)


def test_stop_ends_the_text_before_the_first_stop_string_generated(backend):
    plain = backend.generate(Q1, max_tokens=16, logprobs=True)
    pieces = [t.bytes for t in plain.token_details]
    words = plain.text.split()
    assert len(words) >= 3 and len(pieces) == plain.completion_tokens
    # stop strings from the backend's own answer: a word, a piece of one with a later word, one never said,
    # and a long one that starts earlier but completes after a short one
    for stops in ([words[1]], [words[2][1:], words[1]], ["\u2603never\u2603", words[-1]],
                  [" ".join(words[:3]), words[1][:2]]):
        want, n = incremental_cut(pieces, stops)
        g = backend.generate(Q1, max_tokens=16, stop=stops)
        assert g.text == want and g.finish_reason == "stop", stops
        assert g.completion_tokens == n
    g = backend.generate(Q1, max_tokens=16, stop="\u2603absent\u2603")  # one string, never generated
    assert g.text == plain.text and g.finish_reason == plain.finish_reason


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_in_openai_layout(backend, k):
    g = backend.generate(Q1, max_tokens=12, logprobs=True, top_logprobs=k)
    d = g.token_details
    assert d is not None and len(d) == g.completion_tokens
    assert b"".join(t.bytes for t in d) == g.text.encode()
    assert [t.logprob for t in d] == pytest.approx(g.token_logprobs)
    for t in d:
        assert t.token == t.bytes.decode("utf-8", errors="ignore") and t.logprob <= 0
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == k and tops == sorted(tops, reverse=True)
        assert all(v <= 0 and math.isfinite(v) for v in tops) and sum(math.exp(v) for v in tops) <= 1 + 1e-6
        if k:  # greedy: the token generated is the most likely one
            assert t.top_logprobs[0].bytes == t.bytes and tops[0] == pytest.approx(t.logprob, abs=1e-6)
        o = t.to_openai()
        assert set(o) == {"token", "logprob", "bytes", "top_logprobs"} and o["bytes"] == list(t.bytes)
        assert all(set(a) == {"token", "logprob", "bytes"} for a in o["top_logprobs"])
    plain = backend.generate(Q1, max_tokens=12)
    assert plain.token_details is None and plain.text == g.text


@pytest.mark.parametrize("kw, param", [({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"),
                                       ({"top_logprobs": True}, "top_logprobs"),
                                       ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"),
                                       ({"response_format": {"type": "yaml"}}, "response_format"),
                                       ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
                                        "response_format")])
def test_options_out_of_range_are_refused_naming_the_parameter(backend, kw, param):
    with pytest.raises(OptionError) as e:
        backend.generate(Q1, max_tokens=4, **kw)
    assert e.value.param == param


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, SCHEMA], ids=["json_object", "json_schema"])
def test_json_response_format(backend, fmt):
    g = backend.generate(QJ, max_tokens=80, response_format=fmt)
    assert g.finish_reason == "stop" and json_problem(g.text, fmt) is None, g.text
    assert backend.generate(QJ, max_tokens=80, response_format={"type": "text"}).text == \
        backend.generate(QJ, max_tokens=80).text


def test_cancel_stops_within_a_token_and_leaves_the_backend_usable(backend):
    plain = backend.generate(Q1, max_tokens=12)
    with pytest.raises(GenerationCancelled) as e:
        backend.generate(Q1, max_tokens=12, cancel=lambda: True)
    assert e.value.completion_tokens == 0
    polls: list[int] = []

    def after_three() -> bool:
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(GenerationCancelled) as e:
        backend.generate(Q1, max_tokens=12, cancel=after_three)
    assert len(polls) == 4 and e.value.completion_tokens <= 3   # polled before and between tokens
    again = backend.generate(Q1, max_tokens=12, cancel=lambda: False)
    assert again.text == plain.text and again.completion_tokens == plain.completion_tokens


@pytest.mark.parametrize("with_stop", [False, True], ids=["plain", "stop"])
def test_on_text_streams_pieces_that_join_to_the_text(backend, with_stop):
    plain = backend.generate(Q1, max_tokens=12)
    stops = [plain.text.split()[2][1:], "\u2603never\u2603"] if with_stop else None
    pieces: list[str] = []
    g = backend.generate(Q1, max_tokens=12, stop=stops, on_text=pieces.append)
    assert "".join(pieces) == g.text and all(isinstance(p, str) and p for p in pieces)
    assert len(pieces) > 1                                     # as generated, not once at the end
    if with_stop:
        assert g.text == backend.generate(Q1, max_tokens=12, stop=stops).text and g.finish_reason == "stop"
    else:
        assert g.text == plain.text


def test_text_emitter_holds_back_what_a_stop_string_may_remove():
    from dreamroute.backends.options import TextEmitter
    sent: list[str] = []
    e = TextEmitter(sent.append, ["STOP", "xy"])
    text = ""
    for piece in ["ab", "cS", "T", "O", "P tail"]:
        text += piece
        e.update(text)
        assert "S" not in "".join(sent)                        # "S", "ST", "STO" could still be a stop's start
    e.finish(text[:text.find("STOP")])
    assert "".join(sent) == "abc"
    raw: list[str] = []
    e = TextEmitter(raw.append, [b"\n\n"], raw=True)
    data = "é ok\n\nrest".encode()
    for i in range(1, len(data) + 1):                           # one byte at a time: "é" is two
        e.update(data[:i])
    e.finish(data[:data.find(b"\n\n")])
    assert "".join(raw) == "é ok" and all(raw)


def test_scripted_json_mode_checks_the_scripted_answer():
    b = ScriptedBackend("s", lambda m: "not json at all")
    with pytest.raises(BackendError, match="not JSON"):
        b.generate(Q1, response_format={"type": "json_object"})
    b = ScriptedBackend("s", lambda m: '{"answer": 7}')
    with pytest.raises(BackendError, match=r"\$\.answer is not of type string"):
        b.generate(Q1, response_format=SCHEMA)
    assert b.generate(Q1, response_format={"type": "json_object"}).text == '{"answer": 7}'


def test_openai_sends_options_upstream_and_cuts_stop_itself():
    log: list = []
    b = openai_backend(log=log, honour_stop=False)
    plain = b.generate(Q1, max_tokens=8)
    stop = plain.text.split()[2]
    g = b.generate(Q1, max_tokens=8, stop=[stop], logprobs=True, top_logprobs=3,
                   response_format={"type": "json_object"})
    body = log[-1][1]
    assert body["stop"] == [stop] and body["top_logprobs"] == 3 and body["logprobs"] is True
    assert body["response_format"] == {"type": "json_object"}
    assert "stop" not in log[0][1] and "response_format" not in log[0][1]
    assert log[0][1]["top_logprobs"] == 1   # at least one is always asked (llama-cpp-python's server needs it)
    g = b.generate(Q1, max_tokens=8, stop=[stop], logprobs=True)   # the server ignores stop: cut here
    assert g.text == plain.text[:plain.text.index(stop)] and g.finish_reason == "stop"
    assert b"".join(t.bytes for t in g.token_details).startswith(g.text.encode())
    with pytest.raises(OptionError, match="sent no logprobs") as e:
        openai_backend(logprobs=False).generate(Q1, max_tokens=4, logprobs=True)
    assert e.value.param == "logprobs"


def test_replay_refuses_what_a_recording_cannot_honour(tmp_path):
    from .test_recorded import small_set
    from dreamroute.backends.replay import replay_backends

    backends, cursor = replay_backends(small_set(tmp_path))
    cursor.select("q1")
    msgs = [{"role": "user", "content": "What is 1 + 4?"}]
    for kw, param in (({"stop": ["4"]}, "stop"), ({"logprobs": True}, "logprobs"),
                      ({"top_logprobs": 2}, "logprobs"), ({"response_format": {"type": "json_object"}},
                                                          "response_format")):
        with pytest.raises(OptionError) as e:
            backends["tactical"].generate(msgs, **kw)
        assert e.value.param == param
    with pytest.raises(GenerationCancelled):
        backends["tactical"].generate(msgs, cancel=lambda: True)
    assert backends["tactical"].generate(msgs, response_format={"type": "text"}, cancel=lambda: False).text
    pieces: list[str] = []
    g = backends["tactical"].generate(msgs, on_text=pieces.append)      # a recording: the text in one piece
    assert pieces == ([g.text] if g.text else [])
