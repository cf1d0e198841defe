"""What a follow-up turn needs survives a restart: a new DreamRoute on the same store and KV
directory scores and restores the follow-up under the tier that served the conversation, at
the same ATP and with the same cached tokens as before the restart (store/conversations.py,
Memory.recall_conversation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig, default_tiers

from .conftest import TIERS, scripted_settings

FIRST = ["Tell me about rivers and the towns along them", "And what about the bridges over them?",
         "Which of those is the oldest?"]


def scripted():
    return {t: ScriptedBackend(f"sha-{t}", lambda m, t=t: f"{t} says the answer is {len(m)} things")
            for t in TIERS}


def follow_up(dr: DreamRoute, conv: str, turns: int):
    """Answer ``turns`` turns of a conversation; returns its messages so far."""
    msgs: list[dict] = []
    for k in range(turns):
        msgs.append({"role": "user", "content": FIRST[k]})
        ans = dr.complete(msgs, conversation_id=conv, max_tokens=24)
        msgs.append({"role": "assistant", "content": ans.text})
    return msgs


def measured(ans, tier: str) -> dict:
    g = ans.final.generation
    r = ans.kv.get(tier)
    # not the context: after the restart the memory also holds A's follow-up, the same prompt,
    # so B's is no longer novel (that is learning, not the restart)
    return {"tier": ans.tier, "surprise_tier": ans.surprise_tier,
            "drift": ans.decision.signals.drift, "atp": ans.atp, "surprise_atp": ans.surprise_atp,
            "prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens, "prefill_s": g.prefill_s,
            "restored": bool(r and r.hit), "source": r.source if r else None, "text": ans.text}


def before_and_after(make, tier: str, turns: int, question: str = "Why is that?") -> tuple[dict, dict]:
    """Two identical conversations A and B: A's follow-up before a restart, B's after it."""
    dr = make()
    hist = {c: follow_up(dr, c, turns) for c in ("A", "B")}
    for b in dr.backends.values():
        b.reset()                      # held nothing, as after a restart: A's state comes from disk
    before = measured(dr.complete(hist["A"] + [{"role": "user", "content": question}], conversation_id="A",
                                  max_tokens=24), tier)
    dr.close()
    dr = make()                                                    # restarted: same db, same kv dir
    after = measured(dr.complete(hist["B"] + [{"role": "user", "content": question}], conversation_id="B",
                                 max_tokens=24), tier)
    dr.close()
    return before, after


@pytest.mark.parametrize("tier", ["tactical", "specialized"])
@pytest.mark.parametrize("turns", [1, 2])
def test_a_restored_follow_up_costs_the_same_after_a_restart(tmp_path, tier, turns):
    settings = scripted_settings(tmp_path)
    before, after = before_and_after(
        lambda: DreamRoute(settings, db=tmp_path / "s.db", backends=scripted(), policy=f"always:{tier}"), tier, turns)
    assert before["restored"] and before["source"] == "disk" and before["surprise_tier"] == tier
    assert after == before                      # same tier, drift, ATP, cached tokens, prefill, answer


def test_the_serving_tier_is_recalled_whatever_routed_it(tmp_path):
    """Routed by the learned policy: after the restart the follow-up is scored under the tier that
    answered the last turn, restoring its state (not under the cheapest, from nothing)."""
    settings = scripted_settings(tmp_path)
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=scripted(), policy="always:specialized")
    msgs = follow_up(dr, "c", 2)
    dr.close()
    with DreamRoute(settings, db=tmp_path / "s.db", backends=scripted()) as dr:   # the default policy
        ans = dr.complete(msgs + [{"role": "user", "content": "Why?"}], conversation_id="c")
        assert ans.surprise_tier == "specialized" and ans.kv["specialized"].hit
        assert ans.kv["specialized"].tokens == len(dr.backends["specialized"].prompt_tokens(msgs)) - 1
        assert ans.decision.signals.drift > 0                    # the previous turn is known again


def test_a_conversation_of_a_tier_no_longer_configured_starts_over(tmp_path):
    settings = scripted_settings(tmp_path)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=scripted(), policy="always:specialized") as dr:
        msgs = follow_up(dr, "c", 1)
    two = Settings(tiers=settings.tiers[:2], data_dir=tmp_path)
    b = scripted()
    del b["specialized"]
    with DreamRoute(two, db=tmp_path / "s.db", backends=b) as dr:
        ans = dr.complete(msgs + [{"role": "user", "content": "Why?"}], conversation_id="c")
        assert ans.text and ans.surprise_tier == "sensory"    # scored under the cheapest, as a new one


def test_without_the_store_a_restart_would_score_under_another_tier(tmp_path):
    """The failure this guards against: forgetting the serving tier scores the follow-up under the
    cheapest tier, from nothing (its whole prompt), at a higher ATP."""
    settings = scripted_settings(tmp_path)
    make = lambda: DreamRoute(settings, db=tmp_path / "s.db", backends=scripted(), policy="always:tactical")  # noqa: E731
    before, after = before_and_after(make, "tactical", 1)
    dr = make()
    dr.memory._recalled.add("D")                                  # as if nothing were stored for D
    hist = follow_up(dr, "D", 1)
    dr.close()
    dr = make()
    dr.memory._recalled.add("D")
    forgot = measured(dr.complete(hist + [{"role": "user", "content": "Why is that?"}], conversation_id="D",
                                  max_tokens=24), "tactical")
    dr.close()
    assert forgot["surprise_tier"] == "sensory" and forgot["surprise_atp"] > after["surprise_atp"]


@pytest.mark.model
def test_real_sensory_follow_up_restores_the_same_after_a_restart(tmp_path):
    """The real sensory model serving a conversation above a cheaper (scripted) tier."""
    pytest.importorskip("llama_cpp")
    from dreamroute.backends.llama import LlamaBackend
    from dreamroute.errors import ModelFileError
    from dreamroute.backends.registry import resolve_model

    sensory = default_tiers()[0].model_copy(update={"n_threads": 2, "n_ctx": 2048})
    try:
        path = resolve_model(sensory.source, Path(tempfile.gettempdir()) / "dreamroute-test-models")
    except ModelFileError as e:
        pytest.skip(f"sensory GGUF cannot be resolved: {e}")
    stub = TierConfig(name="stub", model="scripted-stub", backend="scripted", params_b=0.05)
    settings = Settings(tiers=[stub, sensory], data_dir=tmp_path)

    def make():
        backends = {"stub": ScriptedBackend("sha-stub", lambda m: "stub"), "sensory": LlamaBackend(sensory, path)}
        return DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="always:sensory")
    before, after = before_and_after(make, "sensory", 1, "Name one of them in one word.")
    assert before["restored"] and before["surprise_tier"] == "sensory"
    assert after["surprise_tier"] == "sensory" and after["restored"]
    assert after["cached_tokens"] == before["cached_tokens"] and after["text"] == before["text"]
    assert after["atp"] == pytest.approx(before["atp"], rel=1e-9)
    assert after["surprise_atp"] == pytest.approx(before["surprise_atp"], rel=1e-9)
    assert after["drift"] == pytest.approx(before["drift"])
