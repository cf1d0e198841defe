"""Fault tolerance: a failing backend falls back to another tier and is cooled down; forced tiers."""

from __future__ import annotations

import sqlite3

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.errors import BackendError, UnknownTierError
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


def test_cooldown_fallback_order():
    clock = Clock()
    cd = Cooldown(list(TIERS), 60.0, clock=clock)
    assert cd.available() == list(TIERS) and cd.fallback("tactical", ["tactical"]) == "specialized"
    cd.cool("specialized")
    assert cd.available() == ["sensory", "tactical"] and cd.remaining() == {"specialized": 60.0}
    assert cd.fallback("tactical", ["tactical"]) == "sensory"               # nothing above: down
    assert cd.fallback("tactical", ["tactical"], up_only=True) is None
    clock.t += 60.0
    assert cd.available() == list(TIERS) and cd.remaining() == {}
    with pytest.raises(ValueError):
        Cooldown(list(TIERS), -1.0)


@pytest.mark.parametrize("timeout", [False, True])
def test_failing_tier_falls_back_up_and_is_cooled(tmp_path, timeout):
    backends = hierarchy(failing={"tactical"}, timeout=timeout)
    with make(tmp_path, backends) as dr:
        clock = Clock()
        dr.engine.cooldown.clock = clock
        seen = []
        dr.engine.on_failure = seen.append
        a = dr.complete("What is 2 + 2?", tier="tactical")
        assert a.tier == "specialized" and a.text.startswith("specialized")
        assert [f.tier for f in a.failures] == ["tactical"] and seen == a.failures
        assert [(c.tier, c.role) for c in a.calls] == [("specialized", "chosen")]
        assert dr.engine.cooldown.available() == ["sensory", "specialized"]
        # stored: the answer as an experience; the failed call as background work with no ATP
        rows = dr.store.experiences(["tier", "role", "atp_joules"])
        assert [(r["tier"], r["role"]) for r in rows] == [("specialized", "chosen")]
        assert failed_calls(tmp_path / "s.db") == [("failed_call", "tactical", 0, 0.0)]
        # while cooling: the tier is not called again, not even when forced
        b = dr.complete("What is 3 + 3?", tier="tactical")
        assert b.tier == "specialized" and b.failures == [] and backends["tactical"].attempts == 1
        for i in range(6):   # routed requests never choose the cooled tier
            r = dr.complete(f"What is {i} + 1?")
            assert all(c.tier != "tactical" for c in r.calls)
        assert backends["tactical"].attempts == 1
        clock.t += 61.0      # expired: tried again (and cooled again)
        c = dr.complete("What is 4 + 4?", tier="tactical")
        assert backends["tactical"].attempts == 2 and c.tier == "specialized"
        assert dr.store.verify_ledger().ok


def test_top_tier_failing_falls_back_down(tmp_path):
    with make(tmp_path, hierarchy(failing={"specialized"})) as dr:
        a = dr.complete("What is 2 + 2?", tier="specialized")
        assert a.tier == "tactical" and [f.tier for f in a.failures] == ["specialized"]


def test_every_tier_failing_fails_the_request_and_stores_no_experience(tmp_path):
    with make(tmp_path, hierarchy(failing=set(TIERS))) as dr:
        with pytest.raises(BackendError, match="no tier could answer"):
            dr.complete("What is 2 + 2?")
        assert dr.store.count_experiences() == 0
        assert sorted(t for _, t, _, _ in failed_calls(tmp_path / "s.db")) == sorted(TIERS)
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
    with make(tmp_path, hierarchy(failing={"tactical"}), cooldown_s=None) as dr:
        with pytest.raises(BackendError, match="model crashed"):
            dr.complete("What is 2 + 2?", tier="tactical")
        assert failed_calls(tmp_path / "s.db") == [] and dr.store.count_experiences() == 0


def test_forced_tier(tmp_path):
    with make(tmp_path, hierarchy()) as dr:
        for t in TIERS:
            a = dr.complete("What is 2 + 2?", tier=t)
            assert a.tier == t and a.decision.policy == f"always:{t}" and len(a.calls) == 1
            assert a.surprise_atp == 0.0   # always:TIER needs no surprise
        assert dr.policy.name == "dreamroute"
        with pytest.raises(UnknownTierError):
            dr.complete("What is 2 + 2?", tier="huge")
