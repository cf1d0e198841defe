"""The router end to end over scripted backends: learning, pacing, audits, feedback, resume."""

from __future__ import annotations

import math

import pytest

from dreamroute import DreamRoute
from dreamroute.errors import BackendError, ConfigError, UnknownTierError
from dreamroute.eval.runner import run_workload
from dreamroute.router.dual_pacer import BudgetPacer
from dreamroute.router.policies import make_policy
from dreamroute.store.store import Store

from .conftest import TIERS, problem_answers, scripted_backends, scripted_settings


def test_router_learns_trust_and_prefers_capable_tiers(tmp_path):
    settings = scripted_settings(tmp_path)
    items, answers = problem_answers(80)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=scripted_backends(answers), seed=1) as dr:
        finals = []
        for it in items:
            ans = dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
            finals.append((ans.tier, ans.outcomes[ans.calls.index(ans.final)].outcome))
        trust = {(r["tier"], r["context"]): r for r in dr.trust()}
        assert dr.store.verify_ledger().ok
    by_tier = {}
    for (tier, _ctx), r in trust.items():
        s = by_tier.setdefault(tier, [0.0, 0])
        s[0] += r["trust"] * r["n"]
        s[1] += r["n"]
    mean = {t: s[0] / s[1] for t, s in by_tier.items() if s[1]}
    assert mean["specialized"] > mean["sensory"]
    # without a budget the router maximises p̂: late requests go to capable tiers
    late = finals[-30:]
    assert sum(1 for t, _ in late if t == "sensory") <= 5
    assert sum(1 for _, o in late if o == "success") >= 20


def test_budget_pacing_lowers_spend(tmp_path):
    items, answers = problem_answers(60)
    spend = {}
    for budget in (None, 3.0):
        settings = scripted_settings(tmp_path / str(budget))
        with DreamRoute(settings, db=tmp_path / f"{budget}.db", backends=scripted_backends(answers),
                        budget=budget, seed=0) as dr:
            for it in items:
                dr.complete(it.prompt, gold=it.answer, grader=it.grader)
            spend[budget] = dr.pacer.average
    assert spend[3.0] < 0.8 * spend[None]


def test_pacer_dual_update():
    p = BudgetPacer(budget=10.0, rate=0.5, lam0=1.0, horizon=2)
    p.update(30.0)  # first request: smoothed spend 30 → λ × exp(0.5 · (30/10 − 1)) = e
    assert p.smoothed == pytest.approx(30.0) and p.lam == pytest.approx(math.e)
    p.update(0.0)  # smoothed 30 + (0 − 30)/2 = 15 → λ × exp(0.5 · 0.5)
    assert p.smoothed == pytest.approx(15.0) and p.lam == pytest.approx(math.e * math.exp(0.25))
    assert p.binding and not p.allows(100.0) and p.allows(0.0)
    for _ in range(200):  # spending well under budget: λ decays to its floor and stops binding
        p.update(1.0)
    assert p.lam == pytest.approx(BudgetPacer.LAMBDA_MIN) and not p.binding
    assert BudgetPacer(None, 0.5).price(1e9) == 0.0
    zero = BudgetPacer(0.0, 0.5)
    assert zero.price(1.0) == math.inf and zero.price(0.0) == 0.0 and zero.binding


def test_escalation_and_audit_are_charged_and_learned(tmp_path):
    settings = scripted_settings(tmp_path, audit_base=1.0, audit_novelty=0.0)
    items, answers = problem_answers(20)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=scripted_backends(answers), policy="cascade:0.9",
                    seed=0) as dr:
        ans = dr.complete(items[-1].prompt, gold=items[-1].answer, grader="gsm8k")
        rows = dr.store.experiences(["role", "tier", "atp_joules", "outcome"])
    # sensory answers malformed → escalated at least once; every call is stored and charged
    assert ans.escalated and [c.tier for c in ans.calls][0] == "sensory"
    assert len(rows) == len(ans.calls) and all(r["atp_joules"] > 0 for r in rows)
    assert ans.atp == pytest.approx(sum(r["atp_joules"] for r in rows))


def test_feedback_updates_trust_and_ledger(tmp_path):
    settings = scripted_settings(tmp_path)
    items, answers = problem_answers(5)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=scripted_backends(answers),
                    policy="always:tactical") as dr:
        ans = dr.complete(items[0].prompt, grader="gsm8k")
        assert all(o.outcome == "unknown" for o in ans.outcomes)
        assert dr.trust() == []
        dr.record_outcome(ans.request.request_id, "success")
        (row,) = dr.trust()
        assert row["tier"] == "tactical" and row["n"] == 1 and row["trust"] > 0.5
        assert dr.store.verify_ledger().ok
        with pytest.raises(ValueError, match="request id"):
            dr.record_outcome("no-such-id", "success")
        with pytest.raises(ValueError, match="rating"):
            dr.record_outcome(ans.request.request_id, 1.5)


def test_unknown_tier_and_policy(tmp_path):
    settings = scripted_settings(tmp_path)
    with pytest.raises(UnknownTierError, match="sensory, tactical, specialized"):
        make_policy("always:huge", list(TIERS), settings.router)
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("bogus", list(TIERS), settings.router)
    with pytest.raises(UnknownTierError):
        settings.tier("huge")


def test_run_resumes_after_a_kill(tmp_path):
    settings = scripted_settings(tmp_path)
    items, answers = problem_answers(12)
    spec = "builtin:arithmetic?n=12"
    db = tmp_path / "run.db"
    backends = scripted_backends(answers)
    calls = {"n": 0}
    real = backends["tactical"].generate

    def dying(*a, **kw):  # the process "dies" on the 6th tactical call
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    backends["tactical"].generate = dying
    with pytest.raises(KeyboardInterrupt):
        run_workload(settings, spec, policy="always:tactical", db=db, backends=backends, progress=False)
    with Store(db) as s:
        stored = len(s.experiences(["id"]))
    assert stored == 5
    backends["tactical"].generate = real
    res = run_workload(settings, spec, policy="always:tactical", db=db, backends=backends, progress=False)
    assert res.skipped == 5 and res.answered == 7 and res.summary["n"] == 12
    res2 = run_workload(settings, spec, policy="always:tactical", db=db, backends=backends, progress=False,
                        fresh=True)
    assert res2.skipped == 0 and res2.summary["n"] == 12 and res2.run_id != res.run_id
    with Store(db) as s:
        assert s.verify_ledger().ok


def test_backend_failure_stores_nothing_for_that_request(tmp_path):
    settings = scripted_settings(tmp_path)
    items, answers = problem_answers(3)
    backends = scripted_backends(answers)
    backends["specialized"] = type(backends["specialized"])("sha-specialized", [])  # no answers left
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="always:specialized") as dr:
        with pytest.raises(BackendError):
            dr.complete(items[0].prompt, gold=items[0].answer, grader="gsm8k")
        assert dr.store.count_experiences() == 0
