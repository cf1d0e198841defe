"""Shared fixtures: a scripted three-tier hierarchy and a temporary store per test (no network)."""

from __future__ import annotations

import re

import pytest

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig
from dreamroute.eval.generated import generate_problems

TIERS = ("sensory", "tactical", "specialized")


def scripted_settings(tmp_path, **router) -> Settings:
    """Settings with three scripted tiers (sizes as in the default hierarchy) and a store in tmp_path."""
    tiers = [TierConfig(name=n, model=f"scripted-{n}", backend="scripted", params_b=p)
             for n, p in zip(TIERS, (0.135, 0.5, 1.5))]
    return Settings(tiers=tiers, data_dir=tmp_path, router=router or {})


def problem_answers(n=60, seed=0):
    items = generate_problems(n, seed=seed)
    return items, {it.prompt: (it.answer, it.meta["level"]) for it in items}


def scripted_backends(answers: dict, skill=(0, 2, 5)) -> dict:
    """sensory/tactical/specialized answer correctly up to level skill[i] (0: never), wrong otherwise.

    Wrong answers are malformed (no "The answer is"), so confidence separates them.
    """
    def make(name, max_level):
        def script(messages):
            prompt = messages[-1]["content"]
            gold, level = answers.get(prompt, ("0", 9))
            if level <= max_level:
                return f"Step by step it works out. The answer is {gold}."
            return "I think it is about 3 or maybe 4"
        return ScriptedBackend(f"sha-{name}", script, decode_s_per_token=0.01 * (1 + 2 * TIERS.index(name)),
                               logprob=-0.1 if max_level else -1.5)
    return {n: make(n, lvl) for n, lvl in zip(TIERS, skill)}


@pytest.fixture
def tmp_settings(tmp_path):
    return scripted_settings(tmp_path)


def final_number(text: str):
    m = re.findall(r"-?\d+", text)
    return m[-1] if m else None
