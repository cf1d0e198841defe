"""The metabolic controller's transitions, driven by a fake clock and measured signals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dreamroute.signals.metabolic import Action, MetabolicController, State
from dreamroute.config import MetabolicConfig

TIERS = ["sensory", "tactical", "specialized"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _ctl(**kw):
    clock = Clock()
    cfg = MetabolicConfig(**{"rest_after_s": 60, "dream_after_s": 120, "dream_min_backlog": 10, **kw})
    return MetabolicController(cfg, TIERS, clock=clock), clock


def test_wake_routes_normally():
    ctl, _ = _ctl()
    k = ctl.on_request(priority=0.0, salience=0.3)
    assert k.state is State.WAKE and k.force_tier is None and k.lam_scale == 1.0 and k.quality_floor is None


def test_focus_on_salient_traffic_with_budget_left_and_back():
    ctl, clock = _ctl(focus_window=5, period_budget_j=1000.0)
    for _ in range(5):
        k = ctl.on_request(0.0, 0.8)
        ctl.on_answer(10.0)
    assert ctl.state is State.FOCUS and k.lam_scale == 0.25 and k.quality_floor == 0.5
    low = ctl.on_request(0.0, 0.2)  # a dull request in FOCUS keeps the normal price
    assert low.state is State.FOCUS and low.lam_scale == 1.0
    for _ in range(5):
        ctl.on_request(0.0, 0.1)
    assert ctl.state is State.WAKE
    assert [t.target for t in ctl.history] == ["FOCUS", "WAKE"]
    assert "mean salience" in ctl.history[0].reason and ctl.history[0].signals["budget_left"] > 0.9


def test_no_focus_when_the_period_budget_is_spent():
    ctl, clock = _ctl(focus_window=5, period_budget_j=100.0, period_s=60)
    for _ in range(5):
        ctl.on_request(0.0, 0.9)
        ctl.on_answer(19.0)  # 95 J of 100 spent
    assert ctl.state is State.WAKE and ctl.budget_left() == pytest.approx(0.05)
    clock.t += 61  # the spending leaves the period window
    assert ctl.budget_left() == 1.0
    ctl.on_request(0.0, 0.9)
    assert ctl.state is State.FOCUS


def test_rest_unloads_bigger_tiers_and_a_request_wakes():
    ctl, clock = _ctl(keep_loaded=1)
    ctl.on_request(0.0, 0.3)
    ctl.on_answer(5.0)
    clock.t += 30
    assert ctl.tick() == [] and ctl.state is State.WAKE
    clock.t += 31
    assert ctl.tick() == [Action("unload", ("tactical", "specialized"))]
    assert ctl.state is State.REST and ctl.snapshot()["unloaded"] == ["tactical", "specialized"]
    assert ctl.tick() == []  # unloading once is enough
    ctl.on_request(0.0, 0.3)
    assert ctl.state is State.WAKE


def test_dream_needs_idle_time_and_a_backlog_and_does_not_block_requests():
    ctl, clock = _ctl()
    clock.t += 130
    assert ctl.tick(backlog=3) == [Action("unload", ("tactical", "specialized"))]
    assert ctl.state is State.REST  # too small a backlog
    assert ctl.tick(backlog=12) == [Action("dream")]
    assert ctl.state is State.DREAM and ctl.dreaming
    ctl.on_request(0.0, 0.3)  # served while the cycle goes on
    assert ctl.state is State.WAKE and ctl.dreaming
    clock.t += 200
    assert ctl.tick(backlog=12) == [Action("unload", ("tactical", "specialized"))]  # no second cycle
    assert ctl.dream_finished(promoted=True) == [Action("reload")]
    assert not ctl.dreaming and ctl.state is State.REST
    assert ctl.dream_finished(promoted=False) == []


def test_crisis_by_priority_or_flag_forces_the_top_tier():
    ctl, clock = _ctl(crisis_hold_s=30)
    k = ctl.on_request(priority=0.99, salience=0.5)
    assert k.state is State.CRISIS and k.force_tier == "specialized"
    k = ctl.on_request(priority=0.0, salience=0.1)
    assert k.force_tier == "specialized"  # held after the crisis request
    clock.t += 31
    ctl.tick()
    assert ctl.state is State.WAKE
    ctl.set_crisis(True)
    clock.t += 1000
    ctl.tick()
    assert ctl.state is State.CRISIS  # a flag holds until cleared, and no REST meanwhile
    ctl.set_crisis(False)
    assert ctl.state is State.WAKE
    reasons = [t.reason for t in ctl.history]
    assert reasons[0].startswith("request priority") and "crisis flag cleared" in reasons


def test_disabled_controller_always_wakes():
    ctl, clock = _ctl(enabled=False)
    assert ctl.on_request(0.99, 0.99).state is State.WAKE
    clock.t += 10_000
    assert ctl.tick(backlog=100) == [] and ctl.state is State.WAKE


@pytest.mark.parametrize("bad", [dict(focus_exit=0.7, focus_enter=0.6), dict(rest_after_s=100, dream_after_s=50),
                                 dict(keep_loaded=0), dict(focus_lambda_scale=0.0)])
def test_config_rejects_inconsistent_thresholds(bad):
    with pytest.raises(ValidationError):
        MetabolicConfig(**bad)
