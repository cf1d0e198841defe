"""The fast path's response cache: keys, eligibility (witnessed successes only), invalidation, reload."""

from __future__ import annotations

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.cache.response import ResponseCache, messages_key, normalise_messages

from .conftest import TIERS, scripted_settings

Q = "Is 91 a prime number? Answer yes or no."


def chat(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def backends(answer="No. The answer is 91 = 7 x 13."):
    return {n: ScriptedBackend(f"sha-{n}", lambda m: answer) for n in TIERS}


def test_key_normalises_whitespace_and_unicode_but_keeps_case_and_order():
    base = messages_key(chat(Q))
    assert messages_key(chat(f"  Is 91 a prime\tnumber?\n\nAnswer  yes or no. ")) == base
    assert messages_key(chat("Caf\u00e9?")) == messages_key(chat("Cafe\u0301?"))   # NFC
    assert messages_key(chat(Q.replace("Is 91", "is 91"))) != base                 # case is kept
    assert messages_key(chat(Q.replace("Is 91 a", "Is 91 not a"))) != base         # negated
    assert messages_key(chat("Answer yes or no. Is 91 a prime number?")) != base  # reordered
    assert messages_key(chat(Q, system="Be brief.")) != base                       # another system prompt
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert messages_key(two) != messages_key(two[::-1])                            # message order
    assert messages_key([{"role": "assistant", "content": Q}]) != base             # roles count
    assert normalise_messages([{"role": "user", "content": None}]) == [("user", "")]


def test_only_witnessed_successes_are_served_and_a_failure_removes_them():
    rc = ResponseCache()
    key = messages_key(chat(Q))
    rc.observe(key, "r1", 1, "No.", "tactical", "novel", 10, 2, "unknown", "none")
    assert rc.get(chat(Q)) is None
    rc.observe(key, "r1", 1, "No.", "tactical", "novel", 10, 2, "success", "user:api")
    hit = rc.get(chat(Q))
    assert hit.text == "No." and hit.request_id == "r1" and hit.witness == "user:api"
    assert rc.get(chat(Q), max_tokens=1) is None            # longer than the request allows
    assert rc.get(chat(Q), tier="sensory") is None          # a forced tier gets only its own answer
    assert rc.get(chat(Q), tier="tactical") is hit
    rc.observe(key, "r2", 2, "Yes.", "sensory", "novel", 10, 2, "failure", "ground_truth")
    assert rc.get(chat(Q)) is hit                           # another answer failed: this one stands
    rc.observe(key, "r3", 3, "  No. ", "sensory", "stable", 10, 2, "failure", "user:api")
    assert rc.get(chat(Q)) is None                          # the same answer failed: removed
    rc.observe(key, "r4", 4, "No.", "tactical", "novel", 10, 2, "success", "ground_truth")
    assert rc.drop_request("r4") == 1 and len(rc) == 0


def test_lru_bound():
    rc = ResponseCache(max_entries=2)
    for i in range(3):
        rc.observe(messages_key(chat(str(i))), f"r{i}", i, "x", "sensory", "novel", 1, 1, "success", "ground_truth")
    assert rc.get(chat("0")) is None and rc.get(chat("2")) is not None and len(rc) == 2
    with pytest.raises(ValueError):
        ResponseCache(max_entries=0)


def test_engine_keeps_the_cache_current_and_it_reloads_from_the_store(tmp_path):
    settings = scripted_settings(tmp_path)
    db = tmp_path / "s.db"
    with DreamRoute(settings, db=db, backends=backends(), fast_path=True, policy="always:tactical") as dr:
        a = dr.complete(chat(Q))                                    # unknown outcome: not served
        assert dr.cached(chat(Q)) is None
        dr.record_outcome(a.request.request_id, "success")          # feedback: a witnessed success
        assert dr.cached(chat(Q)).request_id == a.request.request_id
        g = dr.complete("What is 6 x 7? End with: The answer is N.", gold="42", grader="gsm8k")
        assert dr.cached(chat("What is 6 x 7? End with: The answer is N.")) is None   # graded wrong
        ok = dr.complete("Which number is 7 x 13? End with: The answer is N.", gold="91", grader="gsm8k")
        assert ok.outcomes[0].outcome == "success"
        assert dr.cached(chat("Which number is 7 x 13? End with: The answer is N.")) is not None
        n_exp = dr.store.count_experiences()
        assert dr.cached(chat(Q)) is not None and dr.store.count_experiences() == n_exp  # a lookup stores nothing
        assert g.request.request_id
    with DreamRoute(settings, db=db, backends=backends(), fast_path=True) as dr2:
        assert len(dr2.responses) == 2 and dr2.cached(chat(Q)).request_id == a.request.request_id
        dr2.record_outcome(a.request.request_id, "failure")         # a later failure removes it
        assert dr2.cached(chat(Q)) is None
    with DreamRoute(settings, db=db, backends=backends(), fast_path=True) as dr3:
        assert dr3.cached(chat(Q)) is None and len(dr3.responses) == 1
    with DreamRoute(settings, db=db, backends=backends()) as off:
        assert off.responses is None and off.cached(chat("Which number is 7 x 13? End with: The answer is N.")) is None


def test_an_agreeing_audit_is_a_witness(tmp_path):
    settings = scripted_settings(tmp_path, audit_base=1.0, audit_novelty=0.0)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends(), fast_path=True) as dr:
        a = dr.complete(chat(Q))
        assert a.audited and a.outcomes[a.calls.index(a.final)].witness.startswith("audit:")
        hit = dr.cached(chat(Q))
        assert hit is not None and hit.tier == a.tier and hit.witness.startswith("audit:")


def test_an_answer_cut_off_at_max_tokens_is_never_served(tmp_path):
    backends = {n: ScriptedBackend(f"sha-{n}", lambda m: "one two three four five six. The answer is 6.")
                for n in TIERS}
    q = [{"role": "user", "content": "Count to six."}]
    with DreamRoute(scripted_settings(tmp_path), backends=backends, fast_path=True) as dr:
        cut = dr.complete(q, tier="tactical", max_tokens=3)
        assert cut.final.generation.finish_reason == "length"
        dr.record_outcome(cut.request.request_id, "success")       # the fragment was judged fine...
        assert dr.cached(q, max_tokens=1000) is None                # ...but is never served as complete
        assert dr.store.experiences(["finish_reason"])[-1]["finish_reason"] == "length"
        whole = dr.complete(q, tier="tactical", max_tokens=100)
        dr.record_outcome(whole.request.request_id, "success")
        assert dr.cached(q, max_tokens=1000).text == whole.text
    with DreamRoute(scripted_settings(tmp_path), backends=backends, fast_path=True) as dr:  # reloaded
        assert dr.cached(q, max_tokens=1000).text.endswith("The answer is 6.")
