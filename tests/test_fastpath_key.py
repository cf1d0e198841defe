"""The fast path never merges two requests that can have different answers: its key is the exact
message list (cache/response.py ``fastpath_key``); keys stored before migration 9, taken with
whitespace collapsed, are kept aside and never looked up."""

from __future__ import annotations

import sqlite3
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.cache.response import ResponseCache, fastpath_key, messages_key
from dreamroute.store import schema as T
from dreamroute.store.migrations import MIGRATIONS, sqlite_engine
from dreamroute.store.store import Store

from .conftest import TIERS, scripted_settings

# text where whitespace and Unicode form vary: spaces, tabs, newlines, NBSP, é both ways, |, code
alphabet = st.sampled_from(list("ab1|:=()") + [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u00e9", "e\u0301",
                                               "\u212b", "A\u030a"])
contents = st.lists(alphabet, max_size=12).map("".join)
roles = st.sampled_from(["system", "user", "assistant"])
chats = st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), min_size=1, max_size=4)


def exact(messages) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


@st.composite
def edited(draw):
    """A chat and a copy edited in one place: whitespace inserted, removed or swapped, a Unicode
    form changed, a role changed, two messages' boundary moved, or nothing at all."""
    a = draw(chats)
    b = [dict(m) for m in a]
    i = draw(st.integers(0, len(b) - 1))
    c = b[i]["content"]
    kind = draw(st.sampled_from(["ws_insert", "ws_delete", "ws_swap", "nfc", "nfd", "role", "split", "same"]))
    pos = draw(st.integers(0, len(c)))
    if kind == "ws_insert":
        c = c[:pos] + draw(st.sampled_from([" ", "\t", "\n", "  "])) + c[pos:]
    elif kind == "ws_delete" and any(ch.isspace() for ch in c):
        j = next(k for k, ch in enumerate(c) if ch.isspace())
        c = c[:j] + c[j + 1:]
    elif kind == "ws_swap" and any(ch.isspace() for ch in c):
        j = next(k for k, ch in enumerate(c) if ch.isspace())
        c = c[:j] + ("\t" if c[j] != "\t" else " ") + c[j + 1:]
    elif kind == "nfc":
        c = unicodedata.normalize("NFC", c)
    elif kind == "nfd":
        c = unicodedata.normalize("NFD", c)
    elif kind == "role":
        b[i]["role"] = draw(roles)
    elif kind == "split" and i + 1 < len(b) and c:
        b[i + 1]["content"] = c[pos:] + b[i + 1]["content"]
        c = c[:pos]
    b[i]["content"] = c
    return a, b


@settings(max_examples=400, deadline=None)
@given(edited())
def test_two_lists_share_a_key_only_when_they_are_the_same(pair):
    a, b = pair
    assert (fastpath_key(a) == fastpath_key(b)) == (exact(a) == exact(b))


@settings(max_examples=200, deadline=None)
@given(chats, chats)
def test_independent_lists_share_a_key_only_when_equal(a, b):
    assert (fastpath_key(a) == fastpath_key(b)) == (exact(a) == exact(b))


@settings(max_examples=200, deadline=None)
@given(edited())
def test_the_cache_serves_an_answer_only_to_its_own_message_list(pair):
    a, b = pair
    rc = ResponseCache()
    rc.observe(fastpath_key(a), "r1", 1, "the answer", "tactical", "novel", 5, 2, "success", "user:api")
    assert rc.get(a) is not None
    assert (rc.get(b) is not None) == (exact(a) == exact(b))


def test_key_ignores_only_what_never_reaches_a_model():
    q = [{"role": "user", "content": "x  y"}]
    assert fastpath_key(q) == fastpath_key([{"role": "user", "content": "x  y", "name": "bob"}])
    assert fastpath_key([{"content": "x"}]) == fastpath_key([{"role": "user", "content": "x"}])
    assert fastpath_key([{"role": "user", "content": None}]) == fastpath_key([{"role": "user", "content": ""}])
    assert fastpath_key(q) != fastpath_key([{"role": "user", "content": "x y"}])
    assert messages_key(q) == messages_key([{"role": "user", "content": "x y"}])   # the lenient conversation key


def backends(answer="def f():\n    return 1"):
    return {n: ScriptedBackend(f"sha-{n}", lambda m: answer) for n in TIERS}


def test_code_with_other_indentation_is_not_served_the_cached_answer(tmp_path):
    code = [{"role": "user", "content": "Fix this:\n\nif x:\n    y()\n  z()"}]
    other = [{"role": "user", "content": "Fix this:\n\nif x:\n    y()\n    z()"}]
    with DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=backends(), fast_path=True,
                    policy="always:tactical") as dr:
        a = dr.complete(code)
        dr.record_outcome(a.request.request_id, "success")
        assert dr.cached(code).request_id == a.request.request_id
        assert dr.cached(other) is None and dr.cached([{"role": "user", "content": code[0]["content"] + "\n"}]) is None
    with DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=backends(), fast_path=True) as dr:
        assert dr.cached(code) is not None and dr.cached(other) is None        # reloaded from the store


def test_migration_9_sets_aside_the_keys_stored_with_whitespace_collapsed(tmp_path):
    """A store at schema 8 holds a success keyed the old way: after the upgrade the key is kept
    in messages_hash_v1 and the answer is served to neither spelling of the question."""
    path = tmp_path / "s.db"
    engine = sqlite_engine(path)
    with engine.execution_options(dreamroute_write=True).begin() as conn:
        T.migrations_table.create(conn)
        for version, name, fn in MIGRATIONS[:8]:
            fn(conn)
            conn.execute(T.migrations_table.insert().values(version=version, name=name, applied_at=T.utc_now()))
    engine.dispose()
    asked = [{"role": "user", "content": "a  table:\n| x |  y |"}]
    old_key = messages_key(asked)                                       # what migration 5..8 code stored
    row = T.experience_row(dict(role="chosen", prompt=asked[0]["content"], tier="tactical", context="novel",
                                response="ok", outcome="success", witness="user:api", messages_hash=old_key,
                                finish_reason="stop", completion_tokens=1), "req-1", T.utc_now())
    row.pop("messages_hash_v1")
    row.pop("instance_id", None)                                        # migration 10's column
    con = sqlite3.connect(path)
    with con:
        con.execute(f"INSERT INTO experiences ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))
    con.close()
    with Store(path) as s:
        assert s.applied_migrations[0] == 9                             # then any later ones
        e = s.experiences(["messages_hash", "messages_hash_v1", "response"])[0]
        assert e == {"messages_hash": None, "messages_hash_v1": old_key, "response": "ok"}
        rc = ResponseCache()
        assert rc.load(s) == 0
        assert rc.get(asked) is None and rc.get([{"role": "user", "content": "a table: | x | y |"}]) is None
