"""OpenAIBackend against fake servers that behave as the real llama-cpp-python server was seen to
(tests/test_llama_server.py runs the real one): streams cut short or dropped, a too-long prompt
refused inside a stream, errors with their message, top_logprobs, a deadline for the whole answer,
a dropped kept-alive connection, and prompt scoring whose echoed logprobs are one token early."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from dreamroute.backends.openai_http import OpenAIBackend
from dreamroute.backends.openai_score import _echo_shift
from dreamroute.config import TierConfig
from dreamroute.errors import BackendError

Q = [{"role": "user", "content": "Count to three."}]
TOKENS = ["1", ",", " 2", ",", " 3"]


def chunk(content=None, finish=None, lp=None) -> str:
    ch = {"index": 0, "delta": {"content": content} if content is not None else {}, "finish_reason": finish}
    if lp is not None:
        ch["logprobs"] = {"content": [lp]}
    return f"data: {json.dumps({'choices': [ch]})}\n\n"


def token_lp(tok: str, k: int) -> dict:
    # as llama-cpp-python's server: bytes null; the alternatives a dict turned list, not always sorted
    alts = [{"token": f"<{j}>", "logprob": -3.0 - j, "bytes": None} for j in range(k)]
    alts.insert(len(alts) // 2, {"token": tok, "logprob": -0.1, "bytes": None})
    return {"token": tok, "logprob": -0.1, "bytes": None, "top_logprobs": alts}


def backend(handler, **kw) -> OpenAIBackend:
    tier = TierConfig(**{"name": "remote", "model": "m", "backend": "openai", "base_url": "http://fake.test/v1", **kw})
    return OpenAIBackend(tier, client=httpx.Client(transport=httpx.MockTransport(handler)))


def sse(*parts: str) -> httpx.Response:
    return httpx.Response(200, content="".join(parts).encode(), headers={"content-type": "text/event-stream"})


def answer(body: dict) -> httpx.Response:
    k = body.get("top_logprobs", 0) if body.get("logprobs") else None
    if body.get("stream"):
        parts = [chunk(t, lp=token_lp(t, k) if k is not None else None) for t in TOKENS]
        return sse(*parts, chunk(finish="stop"), "data: [DONE]\n\n")
    content = [token_lp(t, k) for t in TOKENS] if k is not None else None
    return httpx.Response(200, json={"choices": [{"message": {"content": "".join(TOKENS)}, "finish_reason": "stop",
                                                  "logprobs": {"content": content} if content else None}],
                                     "usage": {"prompt_tokens": 40, "completion_tokens": 5}})


def test_a_stream_cut_short_is_an_error_not_a_shorter_answer():
    b = backend(lambda r: sse(chunk("1"), chunk(","), "data: [DONE]\n\n"))   # [DONE] without a finish_reason
    with pytest.raises(BackendError, match="without a finish_reason.*interrupt_requests"):
        b.generate(Q)


def test_a_stream_dropped_before_its_first_token_is_asked_again_unstreamed():
    log: list = []

    def handler(r):
        body = json.loads(r.content)
        log.append(bool(body.get("stream")))
        if body.get("stream"):
            return sse()                       # accepted, then nothing (the server raised inside the stream)
        return httpx.Response(400, json={"error": {"message": "This model's maximum context length is 2048 tokens.",
                                                   "code": "context_length_exceeded"}})
    b = backend(handler)
    with pytest.raises(BackendError) as e:
        b.generate(Q)
    assert e.value.status == 400 and "maximum context length is 2048 tokens" in str(e.value)
    assert log == [True, False] and b._stream_ok and b._logprobs_ok    # a request error changes nothing


def test_options_refused_are_remembered_only_once_the_server_answers():
    log: list = []

    def handler(r):
        body = json.loads(r.content)
        log.append((bool(body.get("stream")), bool(body.get("logprobs"))))
        if body.get("stream"):
            return httpx.Response(422, json={"detail": "stream: not supported"})
        return httpx.Response(500, json={"error": {"message": "model crashed"}})
    b = backend(handler)
    with pytest.raises(BackendError, match="HTTP 500: model crashed") as e:
        b.generate(Q)
    assert e.value.status == 500 and log == [(True, True), (False, True)] and b._stream_ok   # not remembered


@pytest.mark.parametrize("body,message", [({"error": {"message": "boom", "type": "x"}}, "boom"),
                                          ({"error": "busy"}, "busy"), ({"detail": "Invalid API key"}, "Invalid API key"),
                                          ({"detail": [{"msg": "field required"}]}, "field required")])
def test_errors_carry_the_upstreams_message(body, message):
    with pytest.raises(BackendError) as e:
        backend(lambda r: httpx.Response(401, json=body)).generate(Q)
    assert e.value.status == 401 and message in str(e.value) and "{" not in str(e.value).split("HTTP 401")[1][:3]


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("stream", [True, False])
def test_top_logprobs_at_least_one_asked_and_k_kept_sorted(k, stream):
    log: list = []

    def handler(r):
        body = json.loads(r.content)
        log.append(body)
        if body.get("stream") and not stream:
            return httpx.Response(400, json={"error": "no streaming"})
        return answer(body)
    b = backend(handler)
    g = b.generate(Q, logprobs=True, top_logprobs=k)
    asked = [body for body in log if body.get("logprobs")][-1]
    assert asked["top_logprobs"] == max(k, 1)
    assert [t.token for t in g.token_details] == TOKENS and b"".join(t.bytes for t in g.token_details) == b"1, 2, 3"
    for t in g.token_details:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == k and tops == sorted(tops, reverse=True)
        assert not k or t.top_logprobs[0].token == t.token
    assert backend(handler, logprobs=False).generate(Q).token_logprobs is None and "logprobs" not in log[-1]


def test_the_deadline_covers_the_whole_answer():
    def slow_stream():
        for t in TOKENS * 50:
            time.sleep(0.02)
            yield chunk(t).encode()
        yield chunk(finish="stop").encode()

    b = backend(lambda r: httpx.Response(200, content=slow_stream(), headers={"content-type": "text/event-stream"}),
                timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"did not finish the answer within 0\.3 s"):
        b.generate(Q)
    assert time.perf_counter() - t0 < 1.0


def test_a_dropped_kept_alive_connection_is_sent_again_once():
    calls: list = []

    def handler(r):
        calls.append(json.loads(r.content))
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=r)
        return answer(calls[-1])
    assert backend(handler).generate(Q).text == "1, 2, 3"
    assert calls[0] == calls[1] and calls[0]["stream"]       # the same request, sent again once

    def down(r):
        raise httpx.ReadError("connection reset", request=r)
    with pytest.raises(BackendError, match="cannot reach"):
        backend(down).generate(Q)


def test_a_stream_without_usage_is_corrected_by_the_templates_tokens_once():
    log: list = []

    def handler(r):
        body = json.loads(r.content)
        log.append(body)
        return answer(body)
    b = backend(handler)
    g = b.generate(Q)
    assert g.extra["usage_estimated"] and g.prompt_tokens == 40 and g.completion_tokens == 5
    assert log[-1]["max_tokens"] == 1 and "stream" not in log[-1]
    n = len(log)
    g2 = b.generate(Q + [{"role": "assistant", "content": "1, 2, 3"}, {"role": "user", "content": "Again."}])
    assert len(log) == n + 1 and g2.prompt_tokens > 40 and g2.extra["prompt_offset"] == g.extra["prompt_offset"]


# ----------------------------------------------------------------------------- score

WORDS = "one two three four five six seven eight nine ten".split() * 2


def echo_handler(shift: bool, log: list, with_tops=True):
    """/v1/completions echoing WORDS (+ one generated word) as llama-cpp-python's server does:
    with ``shift`` each entry holds the distribution predicting the next token."""
    def handler(r):
        body = json.loads(r.content)
        log.append((r.url.path, body))
        if r.url.path != "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        toks = [(" " if i else "") + w for i, w in enumerate(WORDS)] + [" one"]
        lps, tops = [None], [None]
        for i in range(1, len(toks)):
            predicted = toks[i + 1] if shift and i + 1 < len(toks) else toks[i]
            lps.append(-4.0 if shift else -0.2)
            tops.append({predicted: -0.1, toks[i]: lps[-1]} if predicted != toks[i] else {toks[i]: -0.2})
        lp = {"tokens": toks, "token_logprobs": lps}
        if with_tops:
            lp["top_logprobs"] = tops
        return httpx.Response(200, json={"choices": [{"text": " ".join(WORDS), "logprobs": lp}],
                                         "usage": {"prompt_tokens": len(WORDS), "completion_tokens": 1}})
    return handler


def test_score_drops_the_generated_token_and_asks_for_one():
    log: list = []
    b = backend(echo_handler(False, log))
    s = b.score([{"role": "user", "content": " ".join(WORDS)}])
    assert len(s) == len(WORDS) - 1 and all(v == pytest.approx(-0.2) for v in s)
    body = [bd for p, bd in log if p == "/v1/completions"][0]
    assert body["max_tokens"] == 1 and body["echo"] is True and body["logprobs"] == 1
    n = len(log)
    b.score([{"role": "user", "content": "one two"}])
    assert [p for p, _ in log[n:]] == ["/v1/completions"]          # /tokenize: 404 once, not asked again


def test_score_refuses_logprobs_one_token_early_and_remembers():
    log: list = []
    b = backend(echo_handler(True, log))
    with pytest.raises(BackendError, match="server does not return prompt logprobs.*next token"):
        b.score(Q)
    n = len(log)
    with pytest.raises(BackendError, match="server does not return prompt logprobs"):
        b.score(Q)
    assert len(log) == n                                            # not asked again


def test_echo_shift_decides_only_on_evidence():
    toks = ["a", "b", "c", "d", "e", "f"]
    right = [None] + [{t: -0.1} for t in toks[1:]]
    early = [None] + [{toks[i + 1] if i + 1 < len(toks) else "z": -0.1, toks[i]: -3.0} for i in range(1, len(toks))]
    assert _echo_shift(toks, right) is False and _echo_shift(toks, early) is True
    assert _echo_shift(toks[:2], right[:2]) is None and _echo_shift(toks, None) is None
    assert _echo_shift(toks, [None, {"b": math.nan}] + right[2:]) is False
