"""Routing policies on a hand-built Memory (DESIGN.md "Routing a request", steps 3–6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dreamroute.signals.atp import estimated_cost
from dreamroute.backends.base import Generation
from dreamroute.config import RouterConfig
from dreamroute.errors import ConfigError
from dreamroute.router.baselines import CascadePolicy, RandomPolicy
from dreamroute.router.dual_pacer import BudgetPacer
from dreamroute.router.memory import Memory
from dreamroute.router.policies import DreamroutePolicy, make_policy
from dreamroute.router.policy_base import RouteView
from dreamroute.router.types import Call, Request
from dreamroute.signals.features import Signals
from dreamroute.signals.trust import TrustState

TIERS = ["sensory", "tactical", "specialized"]
PARAMS_B = {"sensory": 0.135, "tactical": 0.5, "specialized": 1.5}
PROMPT = "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?"


def make_memory(trust: dict[str, tuple[float, float]], context: str = "stable", config: RouterConfig | None = None,
                rows: list[tuple[str, str, float]] = ()) -> Memory:
    """A Memory with trust Beta(α, β) per tier in ``context`` and index rows (prompt, tier, outcome)."""
    cfg = config or RouterConfig()
    costs = {t: estimated_cost(PARAMS_B[t], 15.0) for t in TIERS}
    mem = Memory(TIERS, cfg, costs)
    mem.versions = {t: i + 1 for i, t in enumerate(TIERS)}
    for t, (a, b) in trust.items():
        mem.trust.set(mem.versions[t], context, TrustState(a, b, 10))
        mem.direct_trust.set(mem.versions[t], context, TrustState(a, b, 10))  # what p̂ shrinks toward
    for i, (prompt, tier, outcome) in enumerate(rows):
        mem.index.add(mem.encoder.encode(prompt), mem.tier_index[tier], outcome, 100, exp_id=i)
    return mem


def make_view(mem: Memory, *, novelty: float = 0.0, context: str = "stable", pacer: BudgetPacer | None = None,
              prompt: str = PROMPT) -> RouteView:
    hood = mem.neighbourhood(mem.encoder.encode(prompt))
    signals = Signals(novelty=novelty, drift=0.0, instability=0.0, surprise=None, surprise_z=None, context=context)
    return RouteView(signals, hood, mem, pacer or BudgetPacer(None, 0.05), len(prompt), prompt)


def high_lambda_pacer(lam: float = 100.0) -> BudgetPacer:
    p = BudgetPacer(50.0, 0.05)
    p.lam = lam
    return p


def request(priority: float = 0.0) -> Request:
    return Request.from_prompt(PROMPT, priority=priority)


# tactical is the most trusted (neither the cheapest nor the top tier)
MIDDLE_BEST = {"sensory": (5.0, 45.0), "tactical": (45.0, 5.0), "specialized": (25.0, 25.0)}
# trust rising with cost
RISING = {"sensory": (5.0, 45.0), "tactical": (25.0, 25.0), "specialized": (45.0, 5.0)}


def tiers_chosen(policy, view, n, priority=0.0):
    return [policy.route(request(priority), view).tier for _ in range(n)]


# ---- DreamroutePolicy: choice ---------------------------------------------------------

def test_without_budget_picks_highest_p_hat_most_of_the_time():
    mem = make_memory(MIDDLE_BEST)
    view = make_view(mem)
    assert view.pacer.lam == 0.0
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=3)
    d = pol.route(request(), view)
    assert max(d.p_hat, key=d.p_hat.get) == "tactical"
    chosen = tiers_chosen(pol, view, 400)
    assert chosen.count("tactical") / len(chosen) >= 0.85
    # Thompson sampling: the others are still explored now and then, never the worst often
    assert chosen.count("sensory") / len(chosen) < 0.05


def test_without_budget_neighbours_move_the_choice():
    # trust is flat, but the specialized tier succeeded on near-identical prompts and sensory failed
    rows = [(PROMPT, "specialized", 1.0)] * 15 + [(PROMPT, "sensory", 0.0)] * 15 + [(PROMPT, "tactical", 0.0)] * 15
    mem = make_memory({t: (5.0, 5.0) for t in TIERS}, rows=rows)
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=0)
    chosen = tiers_chosen(pol, make_view(mem), 300)
    assert chosen.count("specialized") / len(chosen) >= 0.95


def test_budget_pacer_without_budget_keeps_lambda_zero():
    p = BudgetPacer(None, 0.05, lam0=3.0)
    assert p.lam == 0.0
    p.update(1e6)
    assert p.lam == 0.0 and p.price(1e6) == 0.0


def test_high_lambda_picks_the_cheapest_tier():
    mem = make_memory(RISING)
    view = make_view(mem, pacer=high_lambda_pacer())
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=1)
    d = pol.route(request(), view)
    assert d.expected_atp["sensory"] < d.expected_atp["tactical"] < d.expected_atp["specialized"]
    assert d.lam == 100.0
    assert set(tiers_chosen(pol, view, 200)) == {"sensory"}
    # and the same memory without a budget mostly goes to the top tier
    assert tiers_chosen(pol, make_view(mem), 200).count("specialized") >= 170


def test_quality_target_excludes_tiers_below_it():
    mem = make_memory(RISING)
    view = make_view(mem, pacer=high_lambda_pacer())
    # p̂ with no neighbours: sensory (1 + 10·0.1)/12 ≈ 0.17, tactical 0.5, specialized ≈ 0.83
    p_hat = DreamroutePolicy(TIERS, RouterConfig()).route(request(), view).p_hat
    assert p_hat["sensory"] < 0.4 < p_hat["tactical"] < 0.6 < p_hat["specialized"]
    for target, expected in [(None, "sensory"), (0.4, "tactical"), (0.6, "specialized")]:
        pol = DreamroutePolicy(TIERS, RouterConfig(), seed=2, quality_target=target)
        assert set(tiers_chosen(pol, view, 100)) == {expected}, target
    # the config's target is used when the constructor gets none
    pol = DreamroutePolicy(TIERS, RouterConfig(quality_target=0.6), seed=2)
    assert set(tiers_chosen(pol, view, 50)) == {"specialized"}


def test_quality_target_rises_for_high_priority_requests():
    mem = make_memory(RISING)
    view = make_view(mem, pacer=high_lambda_pacer())
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=2, quality_target=0.45)  # tactical p̂ = 0.5
    assert set(tiers_chosen(pol, view, 50)) == {"tactical"}
    assert set(tiers_chosen(pol, view, 50, priority=0.8)) == {"specialized"}  # target 0.55


def test_unreachable_quality_target_falls_back_to_the_best_tier():
    mem = make_memory(MIDDLE_BEST)
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=2, quality_target=0.99)
    assert set(tiers_chosen(pol, make_view(mem, pacer=high_lambda_pacer()), 50)) == {"tactical"}


# ---- DreamroutePolicy: p̂ ---------------------------------------------------------------

@pytest.mark.parametrize("shrinkage", [10.0, 3.0, 0.0])
@pytest.mark.parametrize("context", ["stable", "novel"])
def test_p_hat_without_neighbours_is_trust_shrunk_toward_uniform(shrinkage, context):
    trust = {"sensory": (2.0, 8.0), "tactical": (1.0, 1.0), "specialized": (30.0, 3.0)}
    cfg = RouterConfig(shrinkage=shrinkage)
    mem = make_memory(trust, context=context, config=cfg)
    assert len(mem.index) == 0
    d = DreamroutePolicy(TIERS, cfg).route(request(), make_view(mem, context=context))
    for t, (a, b) in trust.items():
        theta = a / (a + b)
        assert d.p_hat[t] == pytest.approx((1 + shrinkage * theta) / (2 + shrinkage)), t


def test_p_hat_uses_the_context_trust():
    mem = make_memory({"specialized": (30.0, 3.0)}, context="novel")
    pol = DreamroutePolicy(TIERS, RouterConfig())
    novel = pol.route(request(), make_view(mem, context="novel")).p_hat["specialized"]
    stable = pol.route(request(), make_view(mem, context="stable")).p_hat["specialized"]
    assert novel == pytest.approx((1 + 10 * 30 / 33) / 12)
    assert stable == pytest.approx(0.5)  # the prior Beta(1, 1) in a context never observed


def test_p_hat_counts_the_k_nearest_known_neighbours_per_tier():
    cfg = RouterConfig(k=3)
    rows = ([(PROMPT, "sensory", 1.0)] * 3  # the 3 nearest of sensory: all successes
            + [("Describe photosynthesis in one sentence.", "sensory", 0.0)] * 2  # farther, beyond k
            + [(PROMPT, "tactical", 0.0), (PROMPT, "tactical", math.nan)]  # unknown outcome is skipped
            + [(PROMPT + " ok", "specialized", 1.0), (PROMPT, "specialized", 0.0)])
    trust = {"sensory": (3.0, 7.0), "tactical": (1.0, 1.0), "specialized": (4.0, 4.0)}
    mem = make_memory(trust, config=cfg, rows=rows)
    d = DreamroutePolicy(TIERS, cfg).route(request(), make_view(mem))
    w = cfg.shrinkage

    def expected(s, m, theta):
        return (1 + s + w * theta) / (2 + m + w)

    assert d.p_hat["sensory"] == pytest.approx(expected(3, 3, 0.3))
    assert d.p_hat["tactical"] == pytest.approx(expected(0, 1, 0.5))
    assert d.p_hat["specialized"] == pytest.approx(expected(1, 2, 0.5))


# ---- DreamroutePolicy: audits and determinism --------------------------------------------

@pytest.mark.parametrize("n", [0.0, 0.5, 0.8, 1.0])
def test_audit_probability_grows_with_novelty_squared(n):
    # the top tier is never trusted, so nearly every choice has a tier above it to audit
    mem = make_memory({"sensory": (30.0, 5.0), "tactical": (30.0, 5.0), "specialized": (1.0, 60.0)})
    view = make_view(mem, novelty=n)
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=11)
    decisions = [pol.route(request(), view) for _ in range(3000)]
    below_top = [d for d in decisions if d.tier != "specialized"]
    assert len(below_top) > 2900
    rate = sum(d.audit for d in below_top) / len(below_top)
    assert rate == pytest.approx(0.05 + 0.45 * n * n, abs=0.03)
    # a decision for the top tier has nobody above it to audit
    assert not any(d.audit for d in decisions if d.tier == "specialized")


def test_audit_probability_follows_the_config():
    mem = make_memory(MIDDLE_BEST)
    pol = DreamroutePolicy(TIERS, RouterConfig(audit_base=0.0, audit_novelty=0.0), seed=0)
    assert not any(pol.route(request(), make_view(mem, novelty=1.0)).audit for _ in range(300))
    pol = DreamroutePolicy(TIERS, RouterConfig(audit_base=1.0, audit_novelty=0.0), seed=0)
    ds = [pol.route(request(), make_view(mem, novelty=0.0)) for _ in range(300)]
    assert all(d.audit for d in ds if d.tier != "specialized")


def test_top_tier_is_never_audited():
    mem = make_memory({"sensory": (1.0, 60.0), "tactical": (1.0, 60.0), "specialized": (60.0, 1.0)})
    pol = DreamroutePolicy(TIERS, RouterConfig(audit_base=1.0, audit_novelty=0.0), seed=0)
    ds = [pol.route(request(), make_view(mem, novelty=1.0)) for _ in range(200)]
    assert all(d.tier == "specialized" and not d.audit for d in ds)


def trace(seed, view, n=80):
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=seed)
    out = []
    for _ in range(n):
        d = pol.route(request(), view)
        out.append((d.tier, d.audit, d.explored, tuple(sorted(d.p_hat.items()))))
    return out


def test_dreamroute_is_deterministic_for_a_fixed_seed():
    mem = make_memory({t: (5.0, 5.0) for t in TIERS})  # equal trust: the choice is all Thompson noise
    view = make_view(mem, novelty=0.7)
    a, b = trace(5, view), trace(5, view)
    assert a == b
    assert len({t for t, *_ in a}) == 3  # the noise does explore all tiers
    assert [x[:2] for x in trace(6, view)] != [x[:2] for x in a]


def test_explored_marks_a_choice_other_than_the_greedy_one():
    mem = make_memory(MIDDLE_BEST)
    view = make_view(mem)
    pol = DreamroutePolicy(TIERS, RouterConfig(), seed=4)
    ds = [pol.route(request(), view) for _ in range(400)]
    assert all(d.explored == (d.tier != "tactical") for d in ds)
    assert any(d.explored for d in ds)


# ---- baselines ---------------------------------------------------------------------

def call(tier: str, confidence: float | None) -> Call:
    gen = Generation(text="x", prompt_tokens=10, completion_tokens=5, token_logprobs=None,
                     prefill_s=0.01, decode_s=0.05)
    return Call(tier=tier, role="chosen", generation=gen, atp=1.0, confidence=confidence)


@pytest.mark.parametrize("tier,confidence,expected", [
    ("sensory", 0.3, "tactical"),
    ("sensory", 0.0, "tactical"),
    ("sensory", 0.6, None),  # the threshold itself does not escalate
    ("sensory", 0.9, None),
    ("sensory", None, None),  # no confidence signal
    ("tactical", 0.59, "specialized"),
    ("tactical", 0.61, None),
    ("specialized", 0.0, None),  # never past the top
    ("specialized", None, None),
])
def test_cascade_escalates_only_below_threshold_and_never_past_the_top(tier, confidence, expected):
    mem = make_memory({})
    view = make_view(mem)
    pol = CascadePolicy(TIERS, threshold=0.6)
    d = pol.route(request(), view)
    assert d.tier == "sensory" and pol.name == "cascade:0.6"
    assert pol.escalate(d, call(tier, confidence), view) == expected


def test_cascade_walks_up_one_tier_at_a_time():
    mem = make_memory({})
    view = make_view(mem)
    pol = make_policy("cascade:0.9", TIERS, RouterConfig())
    d = pol.route(request(), view)
    path = [d.tier]
    while (nxt := pol.escalate(d, call(path[-1], 0.1), view)) is not None:
        path.append(nxt)
        assert len(path) <= len(TIERS)
    assert path == TIERS


def test_random_top_probability():
    mem = make_memory({})
    view = make_view(mem)
    pol = make_policy("random:0.3", TIERS, RouterConfig(), seed=9)
    assert isinstance(pol, RandomPolicy) and pol.name == "random:0.3"
    chosen = tiers_chosen(pol, view, 4000)
    assert set(chosen) <= {"sensory", "specialized"}  # the top tier or the cheapest, never the middle
    assert chosen.count("specialized") / len(chosen) == pytest.approx(0.3, abs=0.03)


def test_random_uniform_and_extremes():
    mem = make_memory({})
    view = make_view(mem)
    chosen = tiers_chosen(make_policy("random", TIERS, RouterConfig(), seed=1), view, 3000)
    for t in TIERS:
        assert chosen.count(t) / len(chosen) == pytest.approx(1 / 3, abs=0.04)
    assert set(tiers_chosen(RandomPolicy(TIERS, 0.0), view, 100)) == {"sensory"}
    assert set(tiers_chosen(RandomPolicy(TIERS, 1.0), view, 100)) == {"specialized"}
    with pytest.raises(ConfigError):
        RandomPolicy(TIERS, 1.5)
    with pytest.raises(ConfigError):
        make_policy("random:lots", TIERS, RouterConfig())


def test_random_policy_is_seeded():
    mem = make_memory({})
    view = make_view(mem)
    a = tiers_chosen(make_policy("random:0.5", TIERS, RouterConfig(), seed=3), view, 50)
    b = tiers_chosen(make_policy("random:0.5", TIERS, RouterConfig(), seed=3), view, 50)
    c = tiers_chosen(make_policy("random:0.5", TIERS, RouterConfig(), seed=4), view, 50)
    assert a == b != c
    assert np.mean([t == "specialized" for t in a]) > 0.2


def test_escalation_outcomes_are_left_out_of_p_hat():
    """An escalation is observed only when a cheaper answer looked wrong: not a sample of the tier's p̂."""
    mem = make_memory(RISING)
    vec = mem.encoder.encode(PROMPT)
    ti = mem.tier_index["specialized"]
    mem.index.add(vec, ti, 0.0, 100, exp_id=1, direct=False)   # an escalated failure
    mem.index.add(vec, ti, 1.0, 100, exp_id=2)                 # a direct success
    hood = mem.neighbourhood(vec)
    assert mem.neighbour_counts(hood, "specialized") == (1.0, 1)
    assert len(hood.rows_all) == 2                              # instability still sees both


def test_cascade_threshold_must_be_a_confidence():
    from dreamroute.errors import ConfigError
    for bad in ("cascade:2", "cascade:-0.1"):
        with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
            make_policy(bad, TIERS, RouterConfig())
    assert make_policy("cascade:0.6", TIERS, RouterConfig()).threshold == 0.6
