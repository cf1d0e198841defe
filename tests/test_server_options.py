"""Every chat-completion field is honoured or refused with a 400 naming it: ``stop``, ``logprobs`` /
``top_logprobs`` (whole and streamed, in OpenAI's layout), ``response_format``, ``n``, tools and
the other fields the tiers cannot honour (scripted tiers; hypothesis over the inputs)."""

from __future__ import annotations

import json

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.server.schema import REFUSED

from .conftest import TIERS
from .test_backend_conformance import incremental_cut
from .test_server import Q, make, sse, stored, user

ANSWER = "tactical says: no, 91 is 7 times 13."
HEALTH = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def json_tiers():
    """Scripted tiers that answer in JSON when the prompt says JSON."""
    def script(n):
        return lambda m: '{"tier": "%s", "answer": 91}' % n if "JSON" in m[-1]["content"] else f"{n} says: no, 91 is 7 times 13."
    return {n: ScriptedBackend(f"sha-{n}", script(n), logprob=lambda tok, i: -0.05 * (1 + i % 4)) for n in TIERS}


@pytest.fixture
def client(tmp_path):
    c, dr = make(tmp_path, json_tiers())
    c.dr, c.db = dr, tmp_path / "s.db"
    return c


def post(c, **kw):
    body = {"model": "tactical", "messages": user(Q), **kw}
    return c.post("/v1/chat/completions", json=body)


def refused(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    return err


# ----------------------------------------------------------------------------- stop

WORD_PIECES = [(w if i == 0 else " " + w).encode() for i, w in enumerate(ANSWER.split())]


STOP = st.one_of(st.sampled_from(["no", "7", " times", "91 is", "says: no,", "13.", "tactical", "zz"]),
                 st.text(st.sampled_from("tacsn o,79:1"), min_size=1, max_size=6))


@settings(max_examples=30, **HEALTH)
@given(st.lists(STOP, min_size=1, max_size=4), st.booleans())
def test_stop_lists(client, stops, as_string):
    want, n = incremental_cut(WORD_PIECES, stops)
    stop = stops[0] if as_string and len(stops) == 1 else stops
    body = post(client, stop=stop).json()
    ch = body["choices"][0]
    assert ch["message"]["content"] == want and ch["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == n
    events = sse(post(client, stop=stop, stream=True).text)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == want


def test_stop_on_a_routed_request_and_refused_stop_lists(client):
    body = post(client, model="dreamroute", stop=[" is "]).json()
    assert body["choices"][0]["message"]["content"] == body["dreamroute"]["tier"] + " says: no, 91"
    assert body["choices"][0]["finish_reason"] == "stop"
    before = stored(client.dr, client.db)
    for bad in (["a", "b", "c", "d", "e"], [""], "", [1], {"x": 1}, ["ok", None]):
        refused(post(client, stop=bad), "stop")
    assert stored(client.dr, client.db) == before
    assert post(client, stop=[]).json()["choices"][0]["message"]["content"] == ANSWER


# ----------------------------------------------------------------------------- logprobs

def _content(body):
    return body["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_logprobs_in_openai_layout_whole_and_streamed(client, k):
    body = post(client, logprobs=True, top_logprobs=k).json()
    ch = body["choices"][0]
    content = _content(body)
    assert ch["logprobs"]["refusal"] is None
    assert "".join(t["token"] for t in content) == ch["message"]["content"] == ANSWER
    assert b"".join(bytes(t["bytes"]) for t in content) == ANSWER.encode()
    for j, t in enumerate(content):
        assert set(t) == {"token", "logprob", "bytes", "top_logprobs"}
        assert t["logprob"] == pytest.approx(-0.05 * (1 + j % 4))
        assert len(t["top_logprobs"]) == k and all(set(a) == {"token", "logprob", "bytes"} for a in t["top_logprobs"])
        if k:
            assert t["top_logprobs"][0]["token"] == t["token"]
    assert len(content) == body["usage"]["completion_tokens"]
    events = sse(post(client, logprobs=True, top_logprobs=k, stream=True).text)
    parts = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(p["delta"].get("content") or "" for p in parts) == ANSWER
    streamed = [t for p in parts if p["logprobs"] for t in p["logprobs"]["content"]]
    assert streamed == content
    for p in parts:   # each content chunk carries exactly its own tokens
        if p["delta"].get("content"):
            assert "".join(t["token"] for t in p["logprobs"]["content"]) == p["delta"]["content"]
    assert post(client).json()["choices"][0]["logprobs"] is None


def test_logprobs_through_the_openai_client(client):
    if not isinstance(client, openai.DefaultHttpxClient.__mro__[1]):
        pytest.skip("this starlette's TestClient is not the HTTP client class openai takes")
    oc = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    res = oc.chat.completions.create(model="tactical", messages=user(Q), logprobs=True, top_logprobs=3)
    lp = res.choices[0].logprobs.content
    assert "".join(t.token for t in lp) == ANSWER and len(lp[0].top_logprobs) == 3 and lp[0].bytes
    chunks = list(oc.chat.completions.create(model="tactical", messages=user(Q), logprobs=True, top_logprobs=2,
                                             stream=True))
    toks = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert "".join(toks) == ANSWER
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model="tactical", messages=user(Q), logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs"


@settings(max_examples=25, **HEALTH)
@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=21), st.floats(allow_nan=False, allow_infinity=False),
                 st.text(max_size=3), st.booleans()))
def test_top_logprobs_out_of_range_is_refused(client, k):
    if isinstance(k, float) and k.is_integer() and 0 <= k <= 20:
        k = k + 0.5
    refused(post(client, logprobs=True, top_logprobs=k), "top_logprobs")


def test_top_logprobs_needs_logprobs(client):
    refused(post(client, top_logprobs=2), "top_logprobs")
    refused(post(client, logprobs=False, top_logprobs=2), "top_logprobs")
    assert post(client, top_logprobs=0).json()["choices"][0]["logprobs"] is None
    refused(post(client, logprobs="yes"), "logprobs")


# ----------------------------------------------------------------------------- response_format

def test_json_modes(client):
    msgs = user("Reply in JSON: is 91 prime?")
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
                    "type": "object", "properties": {"tier": {"type": "string"}, "answer": {"type": "integer"}},
                    "required": ["tier", "answer"]}}}):
        for model in ("tactical", "dreamroute"):
            body = post(client, model=model, messages=msgs, response_format=fmt).json()
            assert json.loads(body["choices"][0]["message"]["content"])["answer"] == 91
    assert post(client, response_format={"type": "text"}).json()["choices"][0]["message"]["content"] == ANSWER
    for bad in ({"type": "yaml"}, "json", {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
                {"type": "json_schema", "json_schema": {"name": "has space"}},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}):
        refused(post(client, response_format=bad), "response_format")


def test_a_schema_the_answer_breaks_is_a_backend_failure_not_an_answer(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object", "required": ["nope"]}}}
    before = client.dr.store.count_experiences()
    r = post(client, messages=user("Reply in JSON: is 91 prime?"), response_format=fmt)
    assert r.status_code >= 500 and "lacks 'nope'" in r.json()["error"]["message"]
    assert client.dr.store.count_experiences() == before


# ----------------------------------------------------------------------------- refused fields

IN_USE = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
          "tool_choice": "auto", "functions": [{"name": "f", "parameters": {}}], "function_call": {"name": "f"},
          "logit_bias": {"50256": -100}, "presence_penalty": 0.5, "frequency_penalty": -1.0,
          "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
          "prediction": {"type": "content", "content": "x"}}


def test_every_refused_field_is_named(client):
    assert set(IN_USE) == set(REFUSED)
    before = stored(client.dr, client.db)
    for name, value in IN_USE.items():
        for stream in (False, True):
            err = refused(post(client, stream=stream, **{name: value}), name)
            assert name in err["message"]
    for n in (2, 5, 0, -1):
        err = refused(post(client, n=n), "n")
    assert "identical" in refused(post(client, n=2), "n")["message"]
    refused(post(client, n="2"), "n")
    assert stored(client.dr, client.db) == before      # a refused request changes nothing stored


def test_fields_at_their_neutral_values_are_taken(client):
    neutral = {"n": 1, "tools": IN_USE["tools"], "tool_choice": "none", "functions": [], "function_call": "none",
               "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "modalities": ["text"],
               "parallel_tool_calls": False, "temperature": 0.7, "top_p": 0.9, "seed": 3, "not_an_openai_field": 1}
    body = post(client, **neutral).json()
    assert body["choices"][0]["message"]["content"] == ANSWER and len(body["choices"]) == 1
    refused(post(client, tools=IN_USE["tools"]), "tools")           # tool_choice defaults to auto


# ----------------------------------------------------------------------------- fast path

def test_fast_path_serves_only_plain_requests_their_plain_answers(client):
    first = post(client).json()
    assert client.post("/v1/feedback", json={"id": first["id"], "outcome": "success"}).status_code == 200
    assert post(client).json()["dreamroute"]["fast_path"]
    for kw in ({"stop": ["91"]}, {"logprobs": True}, {"response_format": {"type": "json_object"}}):
        body = post(client, messages=user(Q + " Reply in JSON.") if "response_format" in kw else user(Q), **kw)
        assert not body.json()["dreamroute"]["fast_path"], kw
    cut = post(client, stop=[" is "], messages=user("Is 93 prime?")).json()   # a stop-shaped answer, confirmed
    assert client.post("/v1/feedback", json={"id": cut["id"], "outcome": "success"}).status_code == 200
    plain = post(client, messages=user("Is 93 prime?")).json()
    assert not plain["dreamroute"]["fast_path"] and plain["choices"][0]["message"]["content"] == ANSWER
