"""The reality cache: on-disk states, LRU under a byte budget, restore/save around calls, handoff."""

from __future__ import annotations

import errno
import json
import os

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.cache.reality import RealityCache, restorable_prefix
from dreamroute.cache.reuse import ConversationKV, Prefill
from dreamroute.errors import BackendError, CacheError, WorkloadError
from dreamroute.eval.runner import run_workload
from dreamroute.eval.workloads import load_workload

from .conftest import TIERS, scripted_settings


def test_restorable_prefix():
    assert restorable_prefix([1, 2, 3, 4], [1, 2, 3, 4, 5], 2) == 4
    assert restorable_prefix([1, 2, 3, 9], [1, 2, 3, 4, 5], 3) == 3   # answer re-tokenized: reuse the prompt part
    assert restorable_prefix([1, 7, 3, 4], [1, 2, 3, 4, 5], 3) == 0   # an earlier turn changed: miss
    assert restorable_prefix([], [1, 2], 0) == 0


def test_put_get_stats_and_lru_eviction(tmp_path):
    c = RealityCache(tmp_path / "kv", max_bytes=10_000)
    for i in range(3):
        c.put("id-a", f"conv{i}", "tactical", bytes(3000), 30, 20)
        os.utime(c.path("id-a", f"conv{i}"), (1000 + i, 1000 + i))
    assert c.get("id-a", "conv0").n_tokens == 30          # touching conv0 makes conv1 the least recent
    c.put("id-a", "conv3", "tactical", bytes(3000), 30, 20)
    left = {e.conversation for e in c.entries()}
    assert left == {"conv0", "conv2", "conv3"}
    st = c.stats()
    assert st["bytes"] <= 10_000 and st["entries"] == 3 and st["by_tier"]["tactical"]["entries"] == 3
    assert c.get("id-b", "conv0") is None                 # another model's key
    assert c.get("id-a", "conv0").read_state() == bytes(3000)
    assert c.clear("conv0") == 1 and c.clear() == 2 and c.entries() == []


def test_truncated_and_foreign_files_are_rejected_and_dropped(tmp_path):
    c = RealityCache(tmp_path, max_bytes=1 << 20)
    c.put("id-a", "conv", "tactical", bytes(500), 5, 3)
    p = c.path("id-a", "conv")
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CacheError, match="truncated"):
        c.get("id-a", "conv")
    assert not p.exists()
    c.put("id-b", "conv", "tactical", bytes(500), 5, 3)
    q = c.path("id-a", "conv")
    q.parent.mkdir(parents=True, exist_ok=True)
    q.write_bytes(c.path("id-b", "conv").read_bytes())   # a file of model b where model a looks
    with pytest.raises(CacheError, match="belongs to model"):
        c.get("id-a", "conv")


def test_full_disk_keeps_the_previous_state(tmp_path, monkeypatch):
    c = RealityCache(tmp_path, max_bytes=1 << 20)
    c.put("id-a", "conv", "tactical", b"old-state", 5, 3)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CacheError, match="free disk space"):
        c.put("id-a", "conv", "tactical", b"new-state", 6, 4)
    monkeypatch.undo()
    assert c.get("id-a", "conv").read_state() == b"old-state"
    assert [p.name for p in c.path("id-a", "conv").parent.iterdir()] == [c.path("id-a", "conv").name]


def _chat_backends(log_prob=-0.1):
    return {t: ScriptedBackend(f"sha-{t}", lambda m, t=t: f"{t} says the answer is {len(m)}", logprob=log_prob)
            for t in TIERS}


def _two_turns(dr, conv="c1", first="Tell me about rivers and towns", second="And the bridges?"):
    a1 = dr.complete([{"role": "user", "content": first}], conversation_id=conv)
    msgs = [{"role": "user", "content": first}, {"role": "assistant", "content": a1.text},
            {"role": "user", "content": second}]
    return a1, dr.complete(msgs, conversation_id=conv), msgs


def test_follow_up_turn_restores_and_scores_only_new_tokens(tmp_path):
    settings = scripted_settings(tmp_path)
    with DreamRoute(settings, policy="always:tactical", backends=_chat_backends()) as dr:
        a1, a2, msgs = _two_turns(dr)
        assert not a1.kv_restored and a2.kv_restored
        g, g1 = a2.final.generation, a1.final.generation
        held = g1.prompt_tokens + g1.completion_tokens
        assert a2.kv["tactical"].tokens == held
        assert a2.surprise_tier == "tactical"               # the tier that served the conversation
        # surprise scored the new tokens only, as they were prefilled; generate() then had them all
        assert a2.surprise_atp == pytest.approx(dr.memory.costs["tactical"].joules(g.prompt_tokens - held + 1, 0))
        assert g.cached_tokens == g.prompt_tokens
        assert a2.decision.signals.surprise is not None
        row = dr.store.experiences_for_request(a2.request.request_id)[0]
        assert row["surprise_tier"] == "tactical" and row["cached_tokens"] == g.cached_tokens
        # the on-disk copy is used when the backend no longer holds the conversation
        dr.backends["tactical"].reset()
        msgs2 = msgs + [{"role": "assistant", "content": a2.text}, {"role": "user", "content": "Why?"}]
        a3 = dr.complete(msgs2, conversation_id="c1")
        assert a3.kv["tactical"].source == "disk" and a3.kv_restored


def test_changed_earlier_turn_is_a_miss_and_still_answered(tmp_path):
    settings = scripted_settings(tmp_path)
    with DreamRoute(settings, policy="always:tactical", backends=_chat_backends()) as dr:
        a1, _, msgs = _two_turns(dr)
        dr.backends["tactical"].reset()
        changed = [{"role": "user", "content": "Tell me about lakes instead"}] + msgs[1:]
        a = dr.complete(changed, conversation_id="c1")
        assert not a.kv_restored and "earlier turn" in a.kv["tactical"].reason
        g = a.final.generation  # the whole prompt was evaluated (by the surprise scoring, then reused)
        assert a.surprise_atp == pytest.approx(dr.memory.costs["tactical"].joules(g.prompt_tokens, 0)) and a.text


def test_damaged_cache_file_is_reported_and_the_turn_answered(tmp_path):
    settings = scripted_settings(tmp_path)
    with DreamRoute(settings, policy="always:tactical", backends=_chat_backends()) as dr:
        a1 = dr.complete([{"role": "user", "content": "Hello there friend"}], conversation_id="c9")
        p = dr.kv.cache.path("sha-tactical", "c9")
        p.write_bytes(p.read_bytes()[:-7])
        dr.backends["tactical"].reset()
        msgs = [{"role": "user", "content": "Hello there friend"}, {"role": "assistant", "content": a1.text},
                {"role": "user", "content": "Again?"}]
        a2 = dr.complete(msgs, conversation_id="c9")
        assert a2.text and not a2.kv_restored and "truncated" in a2.kv["tactical"].reason
        assert any("truncated" in e for e in dr.kv.errors)


def test_warm_handoff_after_a_surprising_turn(tmp_path):
    settings = scripted_settings(tmp_path, tau_surprise=-100.0)   # every scored turn counts as surprising
    with DreamRoute(settings, policy="always:sensory", backends=_chat_backends()) as dr:
        for i in range(6):  # surprise has a z-score once the serving tier has 5 observations
            a1, a2, msgs = _two_turns(dr, conv=f"c{i}", first="rivers and towns", second="why " * i + f"q{i}?")
        assert [j.tier for j in dr.kv.pending] == ["tactical"] and dr.kv.pending[0].conversation == "c5"
        assert dr.idle() == 1 and not dr.kv.pending
        assert dr.store.background_atp() > 0
        kv = ConversationKV(dr.kv.cache)
        follow = msgs + [{"role": "assistant", "content": a2.text}, {"role": "user", "content": "More?"}]
        dr.backends["tactical"].reset()
        r = kv.restore("tactical", dr.backends["tactical"], "c5", follow)
        assert r.hit and r.source == "disk" and r.tokens == len(dr.backends["tactical"].prompt_tokens(msgs + [
            {"role": "assistant", "content": a2.text}])) - 1  # all but the generation prompt


def test_run_prefill_reports_evaluated_tokens(tmp_path):
    kv = ConversationKV(RealityCache(tmp_path))
    b = ScriptedBackend("sha-x", lambda m: "ok")
    msgs = [{"role": "user", "content": "a b c d"}, {"role": "assistant", "content": "e f"}]
    tokens, secs = kv.run_prefill(Prefill("x", "conv", msgs), b)
    assert tokens == len(b.prompt_tokens(msgs)) and secs >= 0
    again = kv.run_prefill(Prefill("x", "conv", msgs), b)
    assert again[0] == 0                                      # everything was held already


def test_conversation_workloads_load(tmp_path):
    w = load_workload("../shared/data/routellm/mt_bench/question.jsonl") if os.path.exists(
        "../shared/data/routellm/mt_bench/question.jsonl") else None
    if w is not None:
        assert len(w) == 160 and w.items[1].meta["conversation"] == "81" and w.items[1].meta["turn"] == 1
    p = tmp_path / "conv.jsonl"
    p.write_text(json.dumps({"id": "x", "turns": ["Hi", {"content": "2+2?", "answer": 4}]}) + "\n")
    items = load_workload(p).items
    assert [i.key for i in items] == ["x:t0", "x:t1"] and items[0].answer is None and items[1].answer == "4"
    p.write_text(json.dumps({"id": "x", "turns": []}) + "\n")
    with pytest.raises(WorkloadError, match="non-empty list"):
        load_workload(p)
    p.write_text(json.dumps({"id": "x", "turns": [{"content": ""}]}) + "\n")
    with pytest.raises(WorkloadError, match=":1: turn 0"):
        load_workload(p)


def test_run_sends_conversations_and_resumes_mid_conversation(tmp_path):
    p = tmp_path / "conv.jsonl"
    p.write_text("".join(json.dumps({"id": f"c{i}", "turns": ["Say hi", "Say bye", "Once more"]}) + "\n"
                         for i in range(2)))
    settings = scripted_settings(tmp_path)
    backends = _chat_backends()
    r1 = run_workload(settings, str(p), policy="always:tactical", limit=None, db=tmp_path / "s.db",
                      backends=backends, progress=False)
    assert r1.summary["kv_cache"]["hits"] == 4                # turns 1 and 2 of each conversation
    seen = backends["tactical"].calls[-1]
    assert [m["role"] for m in seen] == ["user", "assistant", "user", "assistant", "user"]
    # a run that fails on a later turn resumes with the conversation rebuilt from the store
    b2 = _chat_backends()
    n = {"calls": 0}

    def flaky(m):
        n["calls"] += 1
        if n["calls"] == 2:
            raise BackendError("killed")
        return "fine"
    b2["tactical"] = ScriptedBackend("sha-tactical", flaky)
    with pytest.raises(BackendError):
        run_workload(settings, str(p), policy="always:tactical", db=tmp_path / "s2.db", backends=b2, progress=False)
    b3 = _chat_backends()
    run_workload(settings, str(p), policy="always:tactical", db=tmp_path / "s2.db", backends=b3, progress=False)
    first = b3["tactical"].calls[0]
    assert [m["role"] for m in first] == ["user", "assistant", "user"]
    assert first[0]["content"] == "Say hi" and first[1]["content"] == "fine"


def test_full_disk_and_foreign_state_during_a_conversation(tmp_path, monkeypatch):
    settings = scripted_settings(tmp_path)
    with DreamRoute(settings, policy="always:tactical", backends=_chat_backends()) as dr:
        real_fsync = os.fsync

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        a1 = dr.complete([{"role": "user", "content": "Hello there"}], conversation_id="c1")
        assert a1.text and any("free disk space" in e for e in dr.kv.errors)
        assert dr.store.count_experiences() == 1                    # the turn itself was stored
        monkeypatch.setattr(os, "fsync", real_fsync)
        dr.complete([{"role": "user", "content": "Hello there"}], conversation_id="c1")
        # a state of another model placed where tactical's should be
        src = dr.kv.cache.path("sha-tactical", "c1")
        other = dr.kv.cache.path("sha-sensory", "c1")
        dr.kv.cache.put("sha-sensory", "c1", "sensory", dr.backends["sensory"].save_state(), 0, 0)
        src.write_bytes(other.read_bytes())
        dr.backends["tactical"].reset()
        msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": a1.text},
                {"role": "user", "content": "Again"}]
        a2 = dr.complete(msgs, conversation_id="c1")
        assert a2.text and not a2.kv_restored and "belongs to model" in a2.kv["tactical"].reason
