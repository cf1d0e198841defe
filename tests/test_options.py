"""Generation options as properties: stop strings, token details, top-k logprobs, JSON checks, the
stream's pieces (hypothesis over their inputs)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute.backends.base import GenOptions, TokenLogprob
from dreamroute.backends.options import (check_options, earliest_stop, json_problem, log_softmax_top,
                                         trim_details)
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.errors import OptionError
from dreamroute.server.generation import stream_pieces

from .test_backend_conformance import incremental_cut

WORDS = st.sampled_from(["the", "cat", "sat", "on", "a", "mat", "é", "日本", "42", "—", "sat."])
TEXT = st.lists(WORDS, min_size=1, max_size=12).map(" ".join)


@given(TEXT, st.lists(st.text(st.sampled_from("atse 日."), min_size=1, max_size=4), max_size=4))
def test_earliest_stop_is_the_first_occurrence_of_any(text, stops):
    got = earliest_stop(text, stops)
    starts = [i for i in range(len(text)) if any(text.startswith(s, i) for s in stops)]
    assert got == (starts[0] if starts else None)
    assert earliest_stop(text.encode(), [s.encode() for s in stops]) == (
        None if got is None else len(text[:got].encode()))


@settings(max_examples=60, deadline=None)
@given(st.lists(WORDS, min_size=1, max_size=15), st.lists(st.text(st.sampled_from("atse 日."), min_size=1,
                                                                  max_size=5), min_size=1, max_size=4))
def test_scripted_stop_over_any_stop_list(words, stops):
    """The scripted backend ends its text as a model generating word by word would, whatever the stops."""
    b = ScriptedBackend("s", lambda m: " ".join(words))
    g = b.generate([{"role": "user", "content": "q"}], max_tokens=50, stop=stops, logprobs=True)
    pieces = [(w if i == 0 else " " + w).encode() for i, w in enumerate(words)]
    want, n = incremental_cut(pieces, stops)
    assert g.text == want and g.completion_tokens == n
    assert all(s not in g.text for s in stops)
    assert g.finish_reason == "stop" or (n == len(words) and g.text == " ".join(words))
    assert b"".join(t.bytes for t in g.token_details).startswith(g.text.encode())
    assert len(g.token_details) <= n


@given(st.lists(st.binary(min_size=1, max_size=4), max_size=10), st.integers(0, 50))
def test_trim_details_keeps_the_tokens_that_begin_within_the_text(pieces, n):
    details = [TokenLogprob(p.decode(errors="ignore"), p, -1.0) for p in pieces]
    kept = trim_details(details, n)
    assert details[:len(kept)] == kept
    starts = np.cumsum([0] + [len(p) for p in pieces])[:-1]
    assert len(kept) == sum(1 for s in starts if s < n)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-30, 30, allow_nan=False), min_size=1, max_size=60), st.integers(0, 25),
       st.data())
def test_log_softmax_top_matches_a_full_sort(row, k, data):
    x = np.asarray(row)
    token = data.draw(st.integers(0, len(row) - 1))
    lp, top = log_softmax_top(x, token, k)
    full = x - (x.max() + math.log(np.exp(x - x.max()).sum()))
    assert lp == pytest.approx(full[token]) and lp <= 1e-12
    assert len(top) == min(k, len(row))
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert [v for _, v in top] == pytest.approx(sorted(full, reverse=True)[:len(top)])
    assert all(full[i] == pytest.approx(v) for i, v in top) and len({i for i, _ in top}) == len(top)


@pytest.mark.parametrize("kw, param", [({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"), ({"stop": [3]}, "stop"),
                                       ({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"),
                                       ({"top_logprobs": 1.5}, "top_logprobs"),
                                       ({"response_format": {"type": "xml"}}, "response_format"),
                                       ({"response_format": "json"}, "response_format")])
def test_check_options_refuses_naming_the_parameter(kw, param):
    with pytest.raises(OptionError) as e:
        check_options(**kw)
    assert e.value.param == param


@given(st.integers(0, 20), st.lists(st.text(min_size=1, max_size=5), max_size=4))
def test_check_options_takes_every_valid_combination(k, stops):
    o = check_options(stop=stops, logprobs=False, top_logprobs=k, response_format={"type": "text"})
    assert o == GenOptions(tuple(stops), k > 0, k, None)
    assert o.kwargs().get("top_logprobs", 0) == k and o.kwargs().get("stop", []) == stops
    assert o.shapes_text == bool(stops) and o.plain == (not stops and k == 0)
    assert check_options(stop="x").stop == ("x",)


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "tags": {"type": "array", "items":
          {"type": "string", "enum": ["a", "b"]}, "maxItems": 2}, "ok": {"type": ["boolean", "null"]}},
          "required": ["n"], "additionalProperties": False}


@pytest.mark.parametrize("text, problem", [
    ('{"n": 3}', None), ('{"n": 3, "tags": ["a", "b"], "ok": null}', None), ('{"n": 3.0}', None),
    ('{"tags": []}', "lacks 'n'"), ('{"n": "3"}', "$.n is not of type integer"), ('{"n": true}', "integer"),
    ('{"n": 1, "x": 2}', "does not allow: 'x'"), ('{"n": 1, "tags": ["c"]}', "$.tags[0] is not one of"),
    ('{"n": 1, "tags": ["a", "a", "b"]}', "3 items"), ('{"n": 1, "ok": 0}', "$.ok is not of type boolean or null"),
    ('[1]', "$ is not of type object"), ("{n: 1}", "not JSON")])
def test_json_problem_follows_the_schema(text, problem):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    got = json_problem(text, fmt)
    assert (got is None) if problem is None else (problem in got)


def test_json_problem_modes():
    assert json_problem("hello", None) is None and json_problem("hello", {"type": "text"}) is None
    assert json_problem('{"a": 1}', {"type": "json_object"}) is None
    assert "not an object" in json_problem("[1, 2]", {"type": "json_object"})
    assert json_problem("[1]", {"type": "json_schema", "json_schema": {"name": "x"}}) is None


def _split(data, raw: bytes) -> list[bytes]:
    """``raw`` cut at drawn byte positions (characters split too)."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(len(raw) - 1, 1)), max_size=8))))
    bounds = [0, *[c for c in cuts if c < len(raw)], len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=80, deadline=None)
@given(TEXT, st.data(), st.integers(0, 4))
def test_stream_pieces_join_to_the_text_and_carry_every_token(text, data, extra):
    raw = text.encode()
    tokens = _split(data, raw) + [b"</stop-tail>"[:extra * 3]] * bool(extra)   # a stop string's token past the text
    details = [TokenLogprob(t.decode(errors="ignore"), t, -0.5) for t in tokens if t]
    pieces = stream_pieces(text, details)
    assert "".join(p for p, _ in pieces) == text
    sent = [c for _, lp in pieces if lp for c in lp["content"]]
    assert sent == [d.to_openai() for d in details[:len(sent)]]
    assert len(sent) >= len(trim_details(details, len(raw)))
    for p, lp in pieces:
        assert lp is not None and lp["refusal"] is None
        assert p.encode() == b"".join(bytes(c["bytes"]) for c in lp["content"])[:len(p.encode())]
    assert [p for p, lp in stream_pieces(text, None)] == [p for p in _words(text)]


def _words(text):
    import re
    return re.findall(r"\S+\s*|\s+", text)


def test_stream_pieces_with_tokens_that_do_not_match_the_text():
    details = [TokenLogprob("x", b"x", -1.0)]
    pieces = stream_pieces("hello world", details)
    assert "".join(p for p, _ in pieces) == "hello world"
    assert pieces[0][1]["content"] == [details[0].to_openai()] and all(lp is None for _, lp in pieces[1:])
    assert json.loads(json.dumps(pieces))  # JSON-serialisable as sent


def test_llama_grammar_of_each_json_mode():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh)")
    from llama_cpp.llama_grammar import JSON_GBNF

    from dreamroute.backends.options import llama_grammar

    assert llama_grammar(None) is None and llama_grammar({"type": "text"}) is None
    assert llama_grammar({"type": "json_object"})._grammar == JSON_GBNF
    assert llama_grammar({"type": "json_schema", "json_schema": {"name": "x"}})._grammar == JSON_GBNF
    g = llama_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert g._root == "root" and '"\\"n\\""' in g._grammar and g._grammar != JSON_GBNF
    for bad in ({"$ref": "http://example.com/schema"}, {"type": "string", "pattern": "(("}):
        with pytest.raises(OptionError, match="cannot be turned into a grammar") as e:
            llama_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
        assert e.value.param == "response_format"
