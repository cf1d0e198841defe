"""Fault tolerance: a failing backend falls back to another tier and is cooled down; forced tiers."""

from __future__ import annotations

import sqlite3

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.errors import BackendError, NoTierAvailableError, TierCoolingError, TierError, UnknownTierError
from dreamroute.router.cooldown import Cooldown
from dreamroute.router.types import Request

from .conftest import TIERS, scripted_settings


class Failing(ScriptedBackend):
    """A backend whose generate() fails (BackendError, or TimeoutError with ``timeout``)."""

    def __init__(self, identity, timeout=False):
        super().__init__(identity, lambda m: "never")
        self.timeout = timeout
        self.attempts = 0

    def generate(self, messages, **kw):
        self.attempts += 1
        if self.timeout:
            raise TimeoutError("the call timed out")
        raise BackendError(f"{self.identity}: model crashed")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def hierarchy(failing=(), timeout=False):
    return {n: Failing(f"sha-{n}", timeout) if n in failing else
            ScriptedBackend(f"sha-{n}", lambda m, n=n: f"{n}: The answer is 4.") for n in TIERS}


def failed_calls(db) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT kind, tier, tokens, atp_joules FROM background_work ORDER BY id").fetchall()
    finally:
        con.close()


def make(tmp_path, backends, **kw):
    kw.setdefault("cooldown_s", 60.0)
    return DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=backends, **kw)


def test_cooldown_deadlines():
    clock = Clock()
    cd = Cooldown(list(TIERS), 60.0, clock=clock)
    assert cd.available() == list(TIERS) and cd.cooling("tactical") == 0.0
    assert cd.cool("specialized", reason="boom")                              # the configured 60 s
    assert cd.available() == ["sensory", "tactical"] and cd.remaining() == {"specialized": 60.0}
    assert cd.reasons["specialized"] == "boom"
    cd.cool("tactical", 5.0)                                                  # an upstream's Retry-After
    assert cd.cooling("tactical") == 5.0
    cd.cool("specialized", 1.0)                                               # a later deadline is kept
    assert cd.cooling("specialized") == 60.0
    clock.t += 5.0
    assert cd.available() == ["sensory", "tactical"]
    clock.t += 55.0
    assert cd.available() == list(TIERS) and cd.remaining() == {}
    off = Cooldown(list(TIERS), None, clock=clock)                            # fallback off: only Retry-After cools
    assert not off.cool("sensory") and off.available() == list(TIERS)
    assert off.cool("sensory", 2.0) and off.available() == ["tactical", "specialized"]
    with pytest.raises(ValueError):
        Cooldown(list(TIERS), -1.0)


@pytest.mark.parametrize("timeout", [False, True])
def test_failing_tier_falls_back_to_the_cheapest_available_and_is_cooled(tmp_path, timeout):
    backends = hierarchy(failing={"sensory"}, timeout=timeout)
    with make(tmp_path, backends, policy="cascade:0") as dr:   # cheapest available first, never escalates
        clock = Clock()
        dr.engine.cooldown.clock = clock
        seen = []
        dr.engine.on_failure = seen.append
        a = dr.complete("What is 2 + 2?")
        assert a.tier == "tactical" and a.text.startswith("tactical")
        assert [f.tier for f in a.failures] == ["sensory"] and seen == a.failures
        assert [(c.tier, c.role) for c in a.calls] == [("tactical", "chosen")]
        assert dr.engine.cooldown.available() == ["tactical", "specialized"]
        # stored: the answer as an experience; the failed call as background work with no ATP
        rows = dr.store.experiences(["tier", "role", "atp_joules"])
        assert [(r["tier"], r["role"]) for r in rows] == [("tactical", "chosen")]
        assert failed_calls(tmp_path / "s.db") == [("failed_call", "sensory", 0, 0.0)]
        for i in range(6):   # while cooling, routed requests never call it
            r = dr.complete(f"What is {i} + 1?")
            assert all(c.tier != "sensory" for c in r.calls) and r.failures == []
        assert backends["sensory"].attempts == 1
        clock.t += 61.0      # expired: tried again (and cooled again)
        c = dr.complete("What is 4 + 4?")
        assert backends["sensory"].attempts == 2 and c.tier == "tactical"
        assert dr.store.verify_ledger().ok


def test_routed_top_tier_failing_falls_back_to_the_cheapest(tmp_path):
    with make(tmp_path, hierarchy(failing={"specialized"}), policy="random:1.0") as dr:   # always the top tier
        a = dr.complete("What is 2 + 2?")
        assert a.tier == "sensory" and [f.tier for f in a.failures] == ["specialized"]


def test_forced_failing_tier_fails_naming_it_and_is_not_answered_by_another(tmp_path):
    backends = hierarchy(failing={"tactical"})
    with make(tmp_path, backends) as dr:
        with pytest.raises(TierError, match="tactical.*model crashed") as ei:
            dr.complete("What is 2 + 2?", tier="tactical")
        assert ei.value.tier == "tactical" and not isinstance(ei.value, TierCoolingError)
        assert all(not b.calls for n, b in backends.items() if n != "tactical")
        with pytest.raises(TierCoolingError, match="tactical"):   # cooling: refused without a call
            dr.complete("What is 3 + 3?", tier="tactical")
        assert backends["tactical"].attempts == 1 and dr.store.count_experiences() == 0


def test_every_tier_failing_fails_the_request_and_stores_no_experience(tmp_path):
    with make(tmp_path, hierarchy(failing=set(TIERS))) as dr:
        with pytest.raises(NoTierAvailableError, match="no tier could answer") as ei:
            dr.complete("What is 2 + 2?")
        assert set(ei.value.failed) | set(ei.value.cooling) == set(TIERS)
        assert dr.store.count_experiences() == 0
        rows = failed_calls(tmp_path / "s.db")
        assert sorted(t for k, t, _, _ in rows if k == "failed_call") == sorted(TIERS)
        assert [k for k, *_ in rows].count("unanswered") == 1
        assert dr.engine.cooldown.available() == []


def test_failed_audit_is_dropped_and_failed_escalation_stops(tmp_path):
    settings = scripted_settings(tmp_path, audit_base=1.0, audit_novelty=0.0)
    backends = hierarchy(failing={"specialized"})
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, cooldown_s=60.0, policy="cascade:1.0") as dr:
        a = dr.complete("What is 2 + 2?")   # cascade:1.0 escalates every answer: sensory → tactical → (failed)
        assert [(c.tier, c.role) for c in a.calls] == [("sensory", "chosen"), ("tactical", "escalated")]
        assert [f.tier for f in a.failures] == ["specialized"]
    with DreamRoute(settings, db=tmp_path / "s2.db", backends=hierarchy(failing={"specialized"}),
                    cooldown_s=60.0, policy="dreamroute") as dr:
        assert dr.engine._call_or_fall_back("specialized", "audit", Request.from_prompt("2 + 2?")) is None
        assert dr.engine.cooldown.available() == ["sensory", "tactical"]
        a = dr.complete("What is 2 + 2?", tier="tactical")
        assert not a.audited   # a forced tier is never audited
        for i in range(4):
            r = dr.complete(f"What is {i} + 5?")
            assert all(c.tier != "specialized" for c in r.calls)


def test_without_cooldown_a_failure_fails_the_request(tmp_path):
    with make(tmp_path, hierarchy(failing={"sensory"}), cooldown_s=None, policy="cascade:0") as dr:
        with pytest.raises(TierError, match="model crashed"):
            dr.complete("What is 2 + 2?")
        assert failed_calls(tmp_path / "s.db") == [("failed_call", "sensory", 0, 0.0)]
        assert dr.store.count_experiences() == 0 and dr.engine.cooldown.available() == list(TIERS)


def test_forced_tier(tmp_path):
    with make(tmp_path, hierarchy()) as dr:
        for t in TIERS:
            a = dr.complete("What is 2 + 2?", tier=t)
            assert a.tier == t and a.decision.policy == f"always:{t}" and len(a.calls) == 1
            assert a.surprise_atp == 0.0   # always:TIER needs no surprise
        assert dr.policy.name == "dreamroute"
        with pytest.raises(UnknownTierError):
            dr.complete("What is 2 + 2?", tier="huge")
