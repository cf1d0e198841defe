"""Spend control (issue 12): the SpendController's price, bank and guard, and replays over shifted
recordings generated here (random shift points, tier names other than the defaults, costs ~1:4:10)."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from dreamroute.errors import ConfigError
from dreamroute.eval.shifted import Levelled, arrange, oracle_accuracy_within, recording
from dreamroute.eval.simulate import replay_once, simulate
from dreamroute.eval.spend import plot_spend, running_average, spend_summary, windowed_average
from dreamroute.router.pacing import SpendController, make_pacer, menu_spend, solve_price

from .conftest import scripted_settings

TIERS = ("pebble", "boulder", "summit")  # not the default hierarchy's names
COSTS = (1.0, 4.0, 10.0)


# ---- the controller on its own -----------------------------------------------------------

def test_price_is_the_smallest_lambda_that_spends_the_target():
    rng = np.random.default_rng(0)
    menus = []
    for _ in range(300):  # two candidates: cheap (1 J) and dear (10 J) with a random gain
        gain = rng.uniform(0, 0.5)
        menus.append((np.array([0.5, 0.5 + gain]), np.array([1.0, 10.0])))
    budget = 4.0
    lam = solve_price(menus, budget, budget)
    V = np.array([m[0] for m in menus])
    A = np.array([m[1] for m in menus])
    assert menu_spend(V, A, lam, budget) <= budget + 1e-9
    assert menu_spend(V, A, lam * 0.98, budget) > budget  # any lower price spends more
    # the dear tier goes to the largest gains: a gain above λ·9/B buys it
    assert math.isclose(np.mean(V[:, 1] - V[:, 0] > lam * 9 / budget), (budget - 1) / 9, abs_tol=0.02)


def test_price_is_bounded_and_never_collapses_below_its_floor():
    menus = [(np.array([0.9, 0.9]), np.array([1.0, 10.0]))] * 50  # nothing worth buying
    assert solve_price(menus, 5.0, 5.0, lam_min=0.05) == 0.05
    menus = [(np.array([0.0, 1.0]), np.array([0.0, 100.0]))] * 50  # gain 1 for 20 budgets: λ = 1/20
    assert solve_price(menus, 5.0, 5.0) == pytest.approx(0.05, rel=1e-6)
    menus = [(np.array([1.0]), np.array([100.0]))] * 50  # nothing within the budget at any price
    assert solve_price(menus, 5.0, 5.0, lam_max=1e4) == 1e4
    c = SpendController(5.0, lam_floor=0.05)
    for _ in range(500):  # a long cheap run: λ stays at the floor, not below
        c.observe([0.95, 0.95], [1.0, 10.0])
        c.update(1.0)
    assert c.lam == pytest.approx(0.05) and not c.binding
    assert c.bank == pytest.approx(500 * 4.0)


def test_bank_spends_savings_and_pays_back_an_overspend_symmetrically():
    c = SpendController(10.0, horizon=100)
    assert c.target() == pytest.approx(10.0)
    for _ in range(10):
        c.update(0.0)
    assert c.target() == pytest.approx(10.0 + 100.0 / 20)  # a young run: H' = n + 10
    for _ in range(20):
        c.update(20.0)
    assert c.bank == pytest.approx(-100.0) and c.target() == pytest.approx(10.0 - 100.0 / 40)
    lo, hi = c.rate_bounds
    c.spent += 1e6
    assert c.target() == pytest.approx(lo * 10.0)


def test_headroom_holds_the_running_average_within_cap_plus_credit():
    c = SpendController(5.0, cap=1.03, credit=2.0)
    spent = []
    rng = random.Random(1)
    for n in range(400):
        h = c.headroom()
        want = rng.choice([1.0, 10.0, 20.0])
        atp = want if want <= h else 1.0  # what a policy respecting the guard would spend
        c.update(atp)
        spent.append(atp)
    run = running_average(spent)
    assert all(r <= 5.0 * (1.03 + 2.0 / (i + 1)) + 1e-9 for i, r in enumerate(run))
    assert run[-1] <= 5.0 * 1.05


def test_the_budget_pacer_interface_is_kept():
    none = SpendController(None)
    assert none.lam == 0.0 and none.price(1e9) == 0.0 and none.allows(1e9) and none.headroom() is None
    assert not none.binding
    zero = SpendController(0.0)
    assert zero.price(1.0) == math.inf and zero.price(0.0) == 0.0 and zero.binding
    c = SpendController(10.0, lam0=2.0)
    assert c.lam == 2.0 and c.price(5.0) == pytest.approx(1.0)
    c.update(30.0)
    c.charge(5.0)  # background work counts
    assert c.spent == 35.0 and c.n == 1 and c.average == 35.0
    assert c.allows(-15.0) and not c.allows(-14.0)  # (35 + x) / 2 <= 10
    with pytest.raises(ConfigError):
        SpendController(-1.0)
    with pytest.raises(ValueError):
        c.observe([0.5], [1.0, 2.0])
    from dreamroute.config import RouterConfig
    assert isinstance(make_pacer(3.0, RouterConfig()), SpendController)
    assert type(make_pacer(3.0, RouterConfig(pacer="dual"))).__name__ == "BudgetPacer"


# ---- replays over shifted recordings -------------------------------------------------------

def pool(n_each: int = 150) -> list[Levelled]:
    """Prompts whose wording says their level (as topics do in real traffic), three levels."""
    out = []
    topics = {0: "Add {a} and {b} apples in the basket.", 1: "A train travels {a} km in {b} hours; "
              "find its speed, then the distance in {a} more hours.",
              2: "Prove that the sum of the first {a} odd numbers equals {a} squared, then bound the "
                 "error of the series with {b} terms."}
    for level, template in topics.items():
        for i in range(n_each):
            out.append(Levelled(f"L{level}:{i}", template.format(a=i + 2, b=(7 * i) % 13 + 1), level))
    return out


def replay(pattern: str, n: int, seed: int, budget: float, shift: float, **router):
    items, marks = arrange(pool(), pattern, n, seed=seed, shift=shift)
    rs = recording(items, tiers=TIERS, costs=COSTS, seed=seed)
    import tempfile
    from pathlib import Path
    run = replay_once(scripted_settings(Path(tempfile.mkdtemp()), **router), rs, "dreamroute", budget=budget,
                      seed=seed, shuffle=None)
    return rs, run, marks


@pytest.mark.parametrize("pattern", ["easy_hard", "hard_easy", "bursts"])
@pytest.mark.parametrize("seed", [0, 1])
def test_spend_holds_in_every_window_of_a_shifting_run(pattern, seed):
    rng = random.Random(100 + seed)
    shift = rng.uniform(0.3, 0.7)  # a random shift point
    budget = COSTS[-1] / 2  # half the top tier's ATP
    rs, run, marks = replay(pattern, 400, seed, budget, shift)
    s = spend_summary(run.trace, budget)
    assert s["whole_run_ratio"] <= 1.05
    assert s["max_running_ratio_after"] <= 1.10  # the running average after the first 50 requests
    assert len(run.trace) == len(rs.items)
    oracle, _ = oracle_accuracy_within(rs, budget)
    assert run.accuracy >= 0.6 * oracle


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tier_mix_follows_a_change_in_difficulty_within_about_20_requests(seed):
    shift = random.Random(seed).uniform(0.35, 0.6)
    budget = COSTS[-1] / 2
    _, run, marks = replay("easy_hard", 400, seed, budget, shift)
    cut = marks[0]
    after = Counter(t["final"] for t in run.trace[cut + 20:cut + 60])
    before = Counter(t["final"] for t in run.trace[cut - 40:cut])
    assert before[TIERS[0]] >= 0.6 * 40  # easy: the cheapest tier
    assert after[TIERS[-1]] >= 0.6 * 40  # hard (only the top tier answers): the top tier, savings allowing
    _, run, marks = replay("hard_easy", 400, seed, budget, shift)
    cut = marks[0]
    after = Counter(t["final"] for t in run.trace[cut + 20:cut + 60])
    assert after[TIERS[0]] >= 0.7 * 40  # easy again: back to the cheapest tier, not paying for the top


def test_windowed_and_running_averages():
    a = [1.0, 3.0, 5.0, 7.0]
    assert list(running_average(a)) == [1.0, 2.0, 3.0, 4.0]
    assert list(windowed_average(a, 2)) == [2.0, 4.0, 6.0]
    assert len(windowed_average(a, 5)) == 0
    trace = [{"atp_joules": x, "correct": i % 2 == 0} for i, x in enumerate(a)]
    s = spend_summary(trace, 2.0, after=1, window=2)
    assert s["whole_run_ratio"] == 2.0 and s["max_running_ratio_after"] == 2.0 and s["max_window_ratio"] == 3.0
    assert spend_summary(trace, None)["whole_run_ratio"] is None


def test_simulate_json_has_a_trace_per_request_and_the_plot_draws_it(tmp_path):
    items, _ = arrange(pool(40), "mixed", 90, seed=3)
    rs = recording(items, tiers=TIERS, costs=COSTS, seed=3)
    res = simulate(scripted_settings(tmp_path), rs, policy="dreamroute", budget=4.0, progress=False)
    tr = res["trace"]
    assert [t["i"] for t in tr] == list(range(len(rs.items)))
    assert [t["key"] for t in tr] == [it.key for it in rs.items]  # file order
    for t in tr:
        assert set(t) >= {"tiers", "atp_joules", "correct", "final", "roles"}
        assert t["tiers"] and all(x in TIERS for x in t["tiers"]) and isinstance(t["correct"], bool)
    assert sum(t["atp_joules"] for t in tr) == pytest.approx(res["atp_joules"])
    assert np.mean([t["correct"] for t in tr]) == pytest.approx(res["accuracy"])
    assert res["spend"]["whole_run_ratio"] == pytest.approx(res["atp_joules"] / len(tr) / 4.0)
    png = plot_spend(tmp_path / "spend.png", {"dreamroute": tr}, 4.0, "spend")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulate_writes_the_trace_and_the_spend_plot(tmp_path):
    import json

    from typer.testing import CliRunner

    from dreamroute.cli import app
    items, _ = arrange(pool(30), "easy_hard", 60, seed=2)
    rs = recording(items, tiers=TIERS, costs=COSTS, seed=2)
    path = tmp_path / "rec.jsonl"
    with open(path, "w") as fh:
        for it in rs.items:
            for t in rs.tiers:
                c = it.calls[t]
                fh.write(json.dumps({"key": it.key, "tier": t, "prompt": it.prompt, "correct": c.correct,
                                     "response": c.response, "atp_joules": c.atp_joules, "seconds": 1.0 + TIERS.index(t)}) + "\n")
    out = tmp_path / "sim.json"
    r = CliRunner().invoke(app, ["simulate", str(path), "--budget", "5", "--json", str(out), "--plot",
                                 str(tmp_path / "c.png"), "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(res["trace"]) == 60 and (tmp_path / "c_spend.png").exists()
