"""Faults (README "Faults", router/faults.py): a named tier answers or fails naming itself; a cooling
tier is called for nothing (surprise scoring, prefills included) until its Retry-After passes; a
routed fallback goes to the cheapest available tier the budget allows, past it only in CRISIS;
each failure is logged, stored and listed in ``failed_tiers``; ``run`` records an item no tier can
answer as failed and goes on."""

from __future__ import annotations

import email.utils
import logging
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from dreamroute import DreamRoute
from dreamroute.backends.openai_http import OpenAIBackend
from dreamroute.backends.openai_upstream import parse_retry_after
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.cache.reuse import Prefill
from dreamroute.config import ServerConfig, TierConfig
from dreamroute.errors import BackendError, NoTierAvailableError, TierCoolingError, TierError
from dreamroute.eval.runner import run_workload
from dreamroute.config import MetabolicConfig
from dreamroute.signals.metabolic import MetabolicController
from dreamroute.server import create_app
from dreamroute.store.store import Store

from .conftest import TIERS, scripted_settings
from .test_fallback import Clock

# (mode, Retry-After): a local exception, a timeout, and an upstream's overload answers
MODES = [("exception", None), ("timeout", None), ("429", 30.0), ("503", None), ("503", 12.0)]


class Flaky(ScriptedBackend):
    """A scripted tier that fails in ``mode`` (every call, or ``fail_score`` for score() too), counts
    every call of any kind, and notes each call made while its tier is cooling (``violations``)."""

    def __init__(self, name, mode=None, retry_after=None, fail_score=False):
        super().__init__(f"sha-{name}", lambda m, n=name: f"{n}: The answer is 4.")
        self.name, self.mode, self.retry_after, self.fail_score = name, mode, retry_after, fail_score
        self.counts: Counter = Counter()
        self.raised = 0            # failures the engine records (generate, or an overloaded score)
        self.violations: list[str] = []
        self.cooldown = None

    def _enter(self, kind):
        self.counts[kind] += 1
        if self.cooldown is not None and self.cooldown.cooling(self.name) > 0:
            self.violations.append(kind)

    def _fail(self):
        if self.mode == "exception":
            raise BackendError(f"{self.name}: model crashed")
        if self.mode == "timeout":
            raise TimeoutError(f"{self.name}: the call timed out")
        raise BackendError(f"{self.name}: HTTP {self.mode}: busy", status=int(self.mode),
                           retry_after_s=self.retry_after)

    def generate(self, messages, **kw):
        self._enter("generate")
        if self.mode:
            self.raised += 1
            self._fail()
        return super().generate(messages, **kw)

    def score(self, messages, **kw):
        self._enter("score")
        if self.mode and self.fail_score:
            self.raised += self.mode in ("429", "503", "timeout")   # overloaded or timed out: recorded
            self._fail()
        return super().score(messages, **kw)

    def prompt_tokens(self, messages):
        self._enter("prompt_tokens")
        return super().prompt_tokens(messages)

    def load_state(self, state):
        self._enter("load_state")
        return super().load_state(state)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def flaky(modes=None, **kw) -> dict:
    return {n: Flaky(n, *((modes or {}).get(n) or (None, None)), **kw) for n in TIERS}


def make(path: Path, backends, *, budget=None, policy="dreamroute", cooldown_s=60.0, crisis=False):
    dr = DreamRoute(scripted_settings(path), db=path / "s.db", backends=backends, budget=budget, policy=policy,
                    cooldown_s=cooldown_s)
    clock = Clock()
    dr.engine.cooldown.clock = clock
    for b in backends.values():
        b.cooldown = dr.engine.cooldown
    if crisis:
        dr.engine.metabolic = MetabolicController(MetabolicConfig(), list(TIERS), clock=clock)
    return dr, clock


def background(db, kind="failed_call") -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT tier, status, detail, request_id FROM background_work WHERE kind = ? "
                           "ORDER BY id", (kind,)).fetchall()
    finally:
        con.close()


# ----------------------------------------------------------------------------- a named tier
@pytest.mark.parametrize("mode,retry", MODES)
@pytest.mark.parametrize("tier", TIERS)
def test_a_named_tier_answers_or_fails_naming_itself(tmp_path, tier, mode, retry):
    backends = flaky({tier: (mode, retry)}, fail_score=True)
    dr, clock = make(tmp_path, backends)
    with pytest.raises(TierError) as ei:
        dr.complete("What is 2 + 2?", tier=tier)
    e = ei.value
    assert e.tier == tier and f"{tier}: " in str(e) and not isinstance(e, TierCoolingError)
    assert e.status == (int(mode) if mode.isdigit() else None)
    assert all(b.total == 0 for n, b in backends.items() if n != tier)        # no other tier, for anything
    cool = retry if retry is not None else 60.0
    assert dr.engine.cooldown.cooling(tier) == cool and backends[tier].counts["generate"] == 1
    clock.t += cool - 0.5
    with pytest.raises(TierCoolingError) as ei:
        dr.complete("What is 3 + 3?", tier=tier)
    assert ei.value.tier == tier and ei.value.retry_after_s == pytest.approx(0.5)
    assert backends[tier].total == 1 and not backends[tier].violations
    clock.t += 1.0
    backends[tier].mode = None
    a = dr.complete("What is 4 + 4?", tier=tier)
    assert a.tier == tier and [c.tier for c in a.calls] == [tier] and a.failures == []
    assert [r[0] for r in background(tmp_path / "s.db")] == [tier]
    assert dr.store.count_experiences() == 1
    dr.close()


# ----------------------------------------------------------------------------- the property
STEP = st.tuples(st.sampled_from(["routed", "routed", "forced"]), st.sampled_from(TIERS),
                 st.one_of(st.none(), st.tuples(st.sampled_from(TIERS), st.sampled_from(MODES + [(None, None)]))),
                 st.sampled_from([0.0, 1.0, 13.0, 31.0, 61.0]), st.booleans())


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.sampled_from([None, 0.0, 2.0, 6.0, 60.0]), steps=st.lists(STEP, min_size=1, max_size=8),
       seed=st.integers(0, 3))
def test_faults_property(budget, steps, seed):
    """Over random fault sequences: no call reaches a cooling tier; a named tier answers or fails naming
    itself; a routed first-call fallback is the cheapest tier that is available and affordable
    (budget rule of router/faults.py), or in CRISIS the highest available; every recorded failure is stored."""
    with tempfile.TemporaryDirectory() as d:
        backends = flaky(fail_score=True)
        dr, clock = make(Path(d), backends, budget=budget, crisis=True)
        ctl, cd, p = dr.engine.metabolic, dr.engine.cooldown, dr.pacer
        with dr:
            for i, (kind, tier, change, dt, crisis) in enumerate(steps):
                if change is not None:
                    backends[change[0]].mode, backends[change[0]].retry_after = change[1]
                clock.t += dt
                ctl.set_crisis(crisis)
                cooling0 = {t for t in TIERS if cd.cooling(t) > 0}
                spent0, n0, raised0 = p.spent, p.n, sum(b.raised for b in backends.values())
                totals0 = {n: b.total for n, b in backends.items()}
                rows0 = len(background(Path(d) / "s.db"))
                prompt = f"What is {i} + {seed}?"
                try:
                    a = dr.complete(prompt, tier=tier if kind == "forced" else None)
                except TierError as e:
                    assert kind == "forced" and e.tier == tier
                    event(f"forced: {type(e).__name__}")
                    a = None
                except NoTierAvailableError as e:
                    assert kind == "routed"
                    assert set(e.failed) | set(e.cooling) | set(e.unaffordable) == set(TIERS)
                    assert not e.unaffordable or (budget is not None and not crisis)
                    event("routed: no tier" + (" (budget)" if e.unaffordable else ""))
                    a = None
                assert all(not b.violations for b in backends.values())
                raised = sum(b.raised for b in backends.values()) - raised0
                assert len(background(Path(d) / "s.db")) - rows0 == raised
                if kind == "forced":
                    assert all(b.total == totals0[n] for n, b in backends.items() if n != tier)
                    assert a is None or [c.tier for c in a.calls] == [tier]
                    continue
                if a is None:
                    continue
                assert not {c.tier for c in a.calls} & cooling0
                lost = {f.tier for f in a.failures if f.role in ("chosen", "surprise")} | cooling0
                first = a.calls[0].tier
                if first == a.decision.tier:
                    continue
                assert a.decision.tier in lost                                 # it fell back
                event("routed: fell back" + (" in CRISIS" if crisis else ""))
                if crisis:
                    assert all(t in lost for t in TIERS[TIERS.index(first) + 1:])
                    continue
                exp = a.decision.expected_atp

                def affordable(t):
                    return budget is None or (spent0 + a.surprise_atp + exp[t]) / (n0 + 1) <= budget + 1e-9
                assert affordable(first)
                assert all(t in lost or not affordable(t) for t in TIERS[:TIERS.index(first)])


# ----------------------------------------------------------------------------- cooling means no calls
def test_retry_after_on_surprise_scoring_cools_the_tier_for_that_long(tmp_path):
    backends = flaky({"sensory": ("429", 30.0)}, fail_score=True)
    dr, clock = make(tmp_path, backends)                  # dreamroute scores surprise under sensory
    with dr:
        a = dr.complete("What is 2 + 2?")
        assert [(f.tier, f.role, f.status, f.cooled_s) for f in a.failures] == [("sensory", "surprise", 429, 30.0)]
        assert a.tier != "sensory" and backends["sensory"].total == 1 and a.decision.signals.surprise is None
        backends["sensory"].mode = None
        for k in range(5):
            clock.t += 5.9
            a = dr.complete(f"What is {k} + 7?")
            assert a.tier != "sensory" and a.decision.signals.surprise is None
        assert backends["sensory"].total == 1 and not backends["sensory"].violations
        clock.t += 0.6                                    # 30.1 s after the 429
        dr.complete("What is 9 + 9?")
        assert backends["sensory"].counts["score"] == 2


def test_a_cooling_tier_gets_no_warm_handoff_prefill(tmp_path):
    backends = flaky({"tactical": ("503", 20.0)})
    dr, clock = make(tmp_path, backends, policy="always:tactical")
    with dr:
        with pytest.raises(TierError):
            dr.complete("What is 2 + 2?")
        dr.kv.schedule(Prefill("tactical", "c1", [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]))
        n = backends["tactical"].total
        assert dr.idle(5) == 0 and backends["tactical"].total == n and not dr.kv.pending


# ----------------------------------------------------------------------------- the budget and CRISIS
def test_fallback_past_the_budget_only_in_crisis(tmp_path):
    for crisis in (False, True):
        backends = flaky({"specialized": ("exception", None)})
        dr, clock = make(tmp_path / str(crisis), backends, budget=0.0, policy="random:1.0", crisis=crisis)
        with dr:
            if crisis:
                dr.engine.metabolic.set_crisis(True)
                a = dr.complete("What is 2 + 2?")            # CRISIS: the highest available tier, any cost
                assert [c.tier for c in a.calls] == ["tactical"] and a.metabolic_state == "CRISIS"
                assert a.atp > 0 and backends["sensory"].total == 0
            else:
                with pytest.raises(NoTierAvailableError, match="budget") as ei:
                    dr.complete("What is 2 + 2?")            # budget 0: no fallback is affordable
                assert set(ei.value.unaffordable) == {"sensory", "tactical"} and ei.value.failed.keys() == {"specialized"}
                assert backends["sensory"].total == backends["tactical"].total == 0
                assert background(tmp_path / str(crisis) / "s.db", "unanswered")[0][0] == "specialized"


def test_fallback_within_the_budget_goes_to_the_cheapest(tmp_path):
    backends = flaky({"specialized": ("exception", None)})
    dr, clock = make(tmp_path, backends, budget=1000.0, policy="random:1.0")
    with dr:
        a = dr.complete("What is 2 + 2?")
        assert [c.tier for c in a.calls] == ["sensory"] and backends["tactical"].total == 0


# ----------------------------------------------------------------------------- the server
def serve(tmp_path, backends, **kw):
    settings = scripted_settings(tmp_path).model_copy(update={"server": ServerConfig()})
    dr, clock = make(tmp_path, backends, **kw)
    return TestClient(create_app(settings, dr=dr)), dr, clock


def chat(c, model, text="What is 2 + 2?"):
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]})


def test_server_failed_tiers_log_and_store(tmp_path, caplog):
    c, dr, clock = serve(tmp_path, flaky({"sensory": ("503", 9.0)}), policy="cascade:0")
    with caplog.at_level(logging.WARNING, logger="dreamroute.router"):
        r = chat(c, "dreamroute")
    info = r.json()["dreamroute"]
    assert r.status_code == 200 and info["tier"] == "tactical"
    assert info["failed_tiers"] == [{"tier": "sensory", "role": "chosen", "status": 503,
                                     "message": "sensory: HTTP 503: busy", "cooled_s": 9.0}]
    assert any("sensory" in m and "HTTP 503" in m and "busy" in m for m in caplog.messages)
    assert background(tmp_path / "s.db") == [("sensory", 503, "sensory: HTTP 503: busy", info["request_id"])]


def test_server_named_tier_errors(tmp_path):
    backends = flaky({"tactical": ("429", 42.0), "specialized": ("exception", None)})
    c, dr, clock = serve(tmp_path, backends)
    r = chat(c, "tactical")                                   # upstream 429: 503 with its Retry-After
    err = r.json()["error"]
    assert r.status_code == 503 and err["code"] == "tier_unavailable" and r.headers["retry-after"] == "42"
    assert "tactical" in err["message"] and "HTTP 429: busy" in err["message"]
    clock.t += 10
    n = backends["tactical"].total
    r = chat(c, "tactical", "What is 5 + 5?")                 # cooling: refused before anything is called
    assert r.status_code == 503 and r.headers["retry-after"] == "32" and backends["tactical"].total == n
    r = chat(c, "specialized")                                # a local failure: 502 naming the tier
    assert r.status_code == 502 and r.json()["error"]["code"] == "tier_failed"
    assert "specialized" in r.json()["error"]["message"] and "model crashed" in r.json()["error"]["message"]
    assert backends["sensory"].counts["generate"] == 0 and dr.store.count_experiences() == 0


def test_server_routed_nothing_affordable_is_503(tmp_path):
    c, dr, clock = serve(tmp_path, flaky({"specialized": ("exception", None)}), budget=0.0, policy="random:1.0")
    r = chat(c, "dreamroute")
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    assert "budget" in r.json()["error"]["message"] and r.headers["retry-after"] == "60"
    assert dr.store.count_experiences() == 0


# ----------------------------------------------------------------------------- run
def test_run_records_an_unanswerable_item_as_failed_and_goes_on(tmp_path):
    settings = scripted_settings(tmp_path)
    backends = flaky({"sensory": ("exception", None)})
    # cascade:0 sends the first item to sensory (fails; budget 0 affords no fallback), later ones to
    # the cheapest tier not cooling (routing, not a fallback)
    res = run_workload(settings, "builtin:arithmetic?n=4", policy="cascade:0", budget=0.0, db=tmp_path / "r.db",
                       backends=backends, progress=False)
    assert res.summary["failed_items"] == res.failed and len(res.failed) == 1
    assert "no tier could answer" in res.failed[0]["error"] and res.summary["n"] == 3 and res.answered == 3
    with Store(tmp_path / "r.db") as s:
        graded = s.graded_items(res.run_id)
    assert len(graded) == 3 and res.failed[0]["item"] not in graded
    assert len(background(tmp_path / "r.db", "unanswered")) == 1
    backends["sensory"].mode = None                           # a rerun retries the failed item only
    again = run_workload(settings, "builtin:arithmetic?n=4", policy="cascade:0", budget=0.0, db=tmp_path / "r.db",
                         backends=flaky(), progress=False)
    assert again.skipped == 3 and again.answered == 1 and again.failed == [] and again.summary["n"] == 4


# ----------------------------------------------------------------------------- openai_http
def test_parse_retry_after():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(date, now=now) == pytest.approx(90.0)
    assert parse_retry_after(email.utils.formatdate(now - 5, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "-3", "nan", "inf"):
        assert parse_retry_after(bad) is None


def overloaded(status, retry_after, log):
    def handler(request: httpx.Request) -> httpx.Response:
        log.append(request.url.path)
        headers = {"retry-after": retry_after} if retry_after is not None else {}
        return httpx.Response(status, json={"error": "busy"}, headers=headers)
    tier = TierConfig(name="remote", model="m", backend="openai", base_url="http://fake.test/v1")
    return OpenAIBackend(tier, client=httpx.Client(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize("status,header,wait", [(429, "7", 7.0), (503, None, None), (500, "3", 3.0)])
def test_openai_http_errors_carry_status_and_retry_after(status, header, wait):
    log: list = []
    b = overloaded(status, header, log)
    with pytest.raises(BackendError) as ei:
        b.generate([{"role": "user", "content": "hi"}])
    assert ei.value.status == status and ei.value.retry_after_s == wait and f"HTTP {status}" in str(ei.value)
    with pytest.raises(BackendError) as ei:
        b.score([{"role": "user", "content": "hi"}])
    if status in (429, 503):   # overloaded, so the engine cools the tier; any other status: no prompt logprobs
        assert ei.value.status == status and ei.value.retry_after_s == wait and ei.value.overloaded
    else:
        assert ei.value.status is None and "prompt logprobs" in str(ei.value)
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    with pytest.raises(BackendError) as ei:
        overloaded(503, date, log).generate([{"role": "user", "content": "hi"}])
    assert 110 < ei.value.retry_after_s <= 120


def test_openai_tier_429_cools_it_for_its_retry_after_and_it_gets_no_request(tmp_path):
    log: list = []
    backends = {**{n: ScriptedBackend(f"sha-{n}", lambda m, n=n: f"{n}: 4") for n in TIERS},
                "sensory": overloaded(429, "5", log)}
    dr, clock = make(tmp_path, backends, policy="cascade:0")
    with dr:
        a = dr.complete("What is 2 + 2?")
        assert a.tier == "tactical" and [(f.tier, f.status, f.cooled_s) for f in a.failures] == [("sensory", 429, 5.0)]
        n = len(log)
        for k in range(4):
            clock.t += 1.2
            assert dr.complete(f"What is {k} + 2?").tier == "tactical"
        assert len(log) == n
        clock.t += 0.3                                        # 5.1 s after the 429: asked again
        dr.complete("What is 8 + 2?")
        assert len(log) > n


def test_an_upstream_refusing_the_request_itself_does_not_cool_its_tier(tmp_path):
    """A 400 (e.g. the prompt over the upstream's context) blames the request: a routed request
    falls back, a pinned one fails, and the tier stays in service for the next request."""
    log: list = []
    backends = {**{n: ScriptedBackend(f"sha-{n}", lambda m, n=n: f"{n}: 4") for n in TIERS},
                "sensory": overloaded(400, None, log)}
    dr, clock = make(tmp_path, backends, policy="cascade:0")
    with dr:
        a = dr.complete("What is 2 + 2?")
        assert a.tier == "tactical" and [(f.tier, f.status, f.cooled_s) for f in a.failures] == [("sensory", 400, 0.0)]
        assert dr.engine.cooldown.cooling("sensory") == 0
        n = len(log)
        dr.complete("What is 3 + 2?")
        assert len(log) > n                                    # asked again at once
        with pytest.raises(TierError) as ei:
            dr.complete("What is 4 + 2?", tier="sensory")
        assert ei.value.status == 400 and dr.engine.cooldown.cooling("sensory") == 0


@pytest.mark.parametrize("status,code,want", [(400, "context_length_exceeded", 400), (422, "upstream_rejected", 400),
                                              (500, "tier_failed", 502), (429, "tier_unavailable", 503)])
def test_a_pinned_tiers_upstream_status_maps_to_the_clients_status(status, code, want):
    from dreamroute.server.errors import from_exception
    msg = "tier 'remote': HTTP %d: the prompt is over the context window" % status if status == 400 else "boom"
    err = from_exception(TierError("remote", msg, status=status))
    assert (err.status, err.code) == (want, code)
