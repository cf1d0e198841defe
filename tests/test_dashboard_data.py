"""The dashboard's data comes from what the store recorded (no server needed)."""

from __future__ import annotations

import pytest

from dreamroute.api import DreamRoute
from dreamroute.config import MetabolicConfig
from dreamroute.signals.metabolic import MetabolicController
from dreamroute.server.dashboard import dashboard_data, dashboard_page

from .conftest import problem_answers, scripted_backends, scripted_settings


def test_dashboard_data_reflects_requests_trust_and_budget(tmp_path):
    items, answers = problem_answers(12)
    with DreamRoute(scripted_settings(tmp_path), backends=scripted_backends(answers), budget=5.0) as dr:
        answered = [dr.complete(it.prompt, gold=it.answer, grader=it.grader) for it in items]
        ctl = MetabolicController(MetabolicConfig(), dr.settings.tier_names)
        d = dashboard_data(dr.store, budget=5.0, metabolic=ctl.snapshot())
    assert d["requests"] == 12
    assert sum(d["tier_mix"].values()) == 12
    assert d["tier_mix"] == {t: sum(a.tier == t for a in answered) for t in {a.tier for a in answered}}
    spent = sum(a.atp for a in answered)
    assert d["atp"][-1]["cumulative"] == pytest.approx(spent, rel=1e-3, abs=1e-2)
    assert d["atp"][-1]["budget"] == pytest.approx(60.0)
    # every ledgered trust update appears once, on the tier of its model version, in [0, 1]
    n_updates = sum(len(pts) for by in d["trust"].values() for pts in by.values())
    assert n_updates == sum(len(a.calls) for a in answered)  # all calls graded here
    assert all(0 <= p[1] <= 1 for by in d["trust"].values() for pts in by.values() for p in pts)
    graded = {t: v["graded"] for t, v in d["cost_quality"].items()}
    assert sum(graded.values()) == sum(sum(c.role != "audit" for c in a.calls) for a in answered)
    assert d["metabolic"]["state"] == "WAKE" and d["cycles"] == []


def test_dashboard_page_is_self_contained():
    html = dashboard_page()
    assert "<svg" in html and "dashboard/data" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


def test_every_tier_that_answered_is_in_the_tier_mix(tmp_path):
    """A tier that answered before an escalation (or only audited) is in the mix with its calls."""
    items, answers = problem_answers(6)
    with DreamRoute(scripted_settings(tmp_path), backends=scripted_backends(answers), policy="cascade:0.6") as dr:
        answered = [dr.complete(it.prompt, gold=it.answer, grader=it.grader) for it in items[:3]]
        d = dashboard_data(dr.store)
        rows = dr.store.experiences(["tier", "role"])
    assert any(a.escalated for a in answered)
    called = {r["tier"] for r in rows}
    assert list(d["tier_mix"]) == [t for t in ("sensory", "tactical", "specialized") if t in called]
    assert d["tier_mix"]["sensory"] == 0 < sum(d["tier_mix"].values()) == 3   # answered, never final
    assert d["tier_mix"] == {t: sum(a.tier == t for a in answered) for t in called}
    assert {t: sum(c.values()) for t, c in d["tier_calls"].items()} == {t: sum(r["tier"] == t for r in rows)
                                                                          for t in called}
    assert d["tier_calls"]["sensory"] == {"chosen": 3}
