"""Exploration (issue 12): an untried tier, or a tier added to a store with history, is tried soon
and adopted when it is better per joule; the demo-like hierarchy tries every tier early."""

from __future__ import annotations

from collections import Counter

import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import RouterConfig, Settings, TierConfig
from dreamroute.eval.generated import generate_problems
from dreamroute.router.policies import DreamroutePolicy

from .conftest import problem_answers, scripted_backends, scripted_settings
from .test_policies import make_memory, make_view, request


def settings_for(tmp_path, tiers: list[tuple[str, float]], **router) -> Settings:
    return Settings(tiers=[TierConfig(name=n, model=f"scripted-{n}", backend="scripted", params_b=p)
                           for n, p in tiers], data_dir=tmp_path, router=router or {})


def backend(name: str, answers: dict, max_level: int, s_per_token: float) -> ScriptedBackend:
    def script(messages):
        gold, level = answers.get(messages[-1]["content"], ("0", 9))
        return f"Step by step. The answer is {gold}." if level <= max_level else "maybe 3 or 4"
    return ScriptedBackend(f"sha-{name}", script, decode_s_per_token=s_per_token, logprob=-0.2)


def test_an_untried_tier_gets_a_bonus_that_fades_as_it_is_tried():
    mem = make_memory({"sensory": (40.0, 10.0), "tactical": (40.0, 10.0)})  # specialized: never seen
    view = make_view(mem)
    pol = DreamroutePolicy(["sensory", "tactical", "specialized"], RouterConfig(), seed=0)
    bonus = pol.exploration_bonus(view)
    assert bonus["specialized"] > 3 * bonus["sensory"]
    mem.direct_trust.set(mem.versions["specialized"], "stable", type(mem.direct_trust.get(1, "stable"))(40.0, 10.0, 200))
    assert pol.exploration_bonus(make_view(mem))["specialized"] < bonus["specialized"] / 3
    assert DreamroutePolicy(["sensory"], RouterConfig(explore_bonus=0.0)).exploration_bonus(view) == {"sensory": 0.0}


def test_demo_like_hierarchy_tries_every_tier_within_20_requests(tmp_path):
    # the demo: 3 tiers, generated problems at levels 1-5, budget 90 J/request (the top tier costs more)
    items = generate_problems(40, seed=0)
    answers = {it.prompt: (it.answer, it.meta["level"]) for it in items}
    for seed in range(3):
        settings = settings_for(tmp_path / str(seed), [("sensory", 0.135), ("tactical", 0.5), ("specialized", 1.5)])
        with DreamRoute(settings, db=tmp_path / f"demo{seed}.db", budget=90.0, seed=seed,
                        backends=scripted_backends(answers)) as dr:
            called = []
            for it in items[:20]:
                ans = dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
                called += [c.tier for c in ans.calls]
            assert dr.memory.costs["specialized"].joules(60, 200) > 90.0  # the top tier is over the budget
        assert set(called) == {"sensory", "tactical", "specialized"}, (seed, Counter(called))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_tier_added_to_a_store_with_500_experiences_is_tried_and_adopted(tmp_path, seed):
    items, answers = problem_answers(800, seed=seed)
    db = tmp_path / "s.db"
    old = [("brook", 0.3), ("ridge", 1.5)]  # brook: levels <= 2, ~2.5 J; ridge: levels <= 5, ~10 J; budget 6 J binds
    with DreamRoute(settings_for(tmp_path, old), db=db, budget=6.0, seed=seed,
                    backends={"brook": backend("brook", answers, 2, 0.01),
                              "ridge": backend("ridge", answers, 5, 0.05)}) as dr:
        i = 0
        while dr.store.count_experiences() < 500:
            it = items[i]
            dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
            i += 1
    # a new middle tier: as right as ridge, at a third of its cost per token (better per joule)
    new = [("brook", 0.3), ("delta", 0.5), ("ridge", 1.5)]
    with DreamRoute(settings_for(tmp_path, new), db=db, budget=6.0, seed=seed,
                    backends={"brook": backend("brook", answers, 2, 0.01), "delta": backend("delta", answers, 5, 0.017),
                              "ridge": backend("ridge", answers, 5, 0.05)}) as dr:
        assert dr.store.count_experiences() >= 500
        finals, calls = [], []
        for it in items[i:i + 200]:
            ans = dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
            finals.append(ans.tier)
            calls.append([c.tier for c in ans.calls])
    first100 = sum("delta" in c for c in calls[:100])
    assert first100 >= 10, first100
    late = Counter(finals[100:])
    # delta does everything ridge does for a third of the ATP: it takes most of what ridge answered
    assert late["delta"] > late["ridge"], late
