"""Replay selection of a DREAM cycle: witnessed teacher successes, dedup, ranking, a prompt-disjoint split."""

from __future__ import annotations

import pytest

from dreamroute.dream.select import heldout_share, plan_replay, witnessed_success
from dreamroute.store.store import Store


def _exp(prompt, tier, outcome, witness="ground_truth", salience=0.5, response="The answer is 1.", turn=0):
    return dict(role="chosen", prompt=prompt, tier=tier, context="stable", outcome=outcome, witness=witness,
                salience=salience, response=response, turn=turn, gold="1" if witness == "ground_truth" else None)


def test_witnessed_success():
    assert witnessed_success("success", "ground_truth") and witnessed_success("success", "audit:specialized")
    assert witnessed_success("success", "user")
    assert not witnessed_success("failure", "ground_truth") and not witnessed_success("success", "")
    assert not witnessed_success("unknown", "none")


def test_plan_selects_dedups_ranks_and_splits(tmp_path):
    with Store(tmp_path / "s.db") as s:
        rows = []
        for i in range(40):
            p = f"question {i}"
            rows.append(_exp(p, "specialized", "success", salience=i / 100))
            if i % 4 == 0:
                rows.append(_exp(p, "tactical", "failure"))
        rows.append(_exp("question 3", "specialized", "success", salience=0.99, response="Better. The answer is 1."))
        rows.append(_exp("question 41", "specialized", "failure"))                       # not a success
        rows.append(_exp("question 42", "specialized", "success", witness="none"))       # not witnessed
        rows.append(_exp("question 43", "specialized", "success", turn=1))               # a later turn
        rows.append(_exp("question 44", "tactical", "success"))                          # the student's own
        for r in rows:
            s.record([r], [])
        plan = plan_replay(s, "tactical", "specialized", heldout_fraction=0.25, seed=1)
    assert plan.candidates == 41
    items = plan.train + plan.heldout
    assert len(items) == 40 and len({it.prompt_hash for it in items}) == 40
    assert not {it.prompt_hash for it in plan.train} & {it.prompt_hash for it in plan.heldout}
    q3 = next(it for it in items if it.prompt == "question 3")
    assert q3.response.startswith("Better") and q3.salience == 0.99
    # the student's failures come first, then salience
    ranks = [it.student_failed for it in plan.train]
    assert ranks == sorted(ranks, reverse=True) and plan.student_failures == 10
    assert 4 <= len(plan.heldout) <= 18
    sal = [it.salience for it in plan.train if not it.student_failed]
    assert sal == sorted(sal, reverse=True)


def test_split_is_stable_and_capped(tmp_path):
    assert heldout_share("abc", 0) == heldout_share("abc", 0) != heldout_share("abc", 1)
    with Store(tmp_path / "s.db") as s:
        for i in range(30):
            s.record([_exp(f"q{i}", "specialized", "success")], [])
        a = plan_replay(s, "tactical", "specialized", seed=0)
        b = plan_replay(s, "tactical", "specialized", seed=0, max_examples=5)
    assert [it.prompt for it in b.train] == [it.prompt for it in a.train][:5]
    assert [it.prompt for it in a.heldout] == [it.prompt for it in b.heldout]
    with pytest.raises(ValueError, match="same tier"):
        plan_replay(s, "tactical", "tactical")


def test_dream_config_from_the_config_file_then_set_flags(tmp_path):
    from dreamroute.config import Settings
    from dreamroute.dream.dream_config import DreamConfig
    from dreamroute.errors import ConfigError
    s = Settings(data_dir=tmp_path, dream={"epochs": 3, "lora_r": 4})

    def dream_config(settings, sets=None):
        return DreamConfig.from_sources(settings.dream, sets)
    assert (dream_config(s).epochs, dream_config(s).lora_r) == (3, 4)
    cfg = dream_config(s, ["epochs=1", "target_modules=[q_proj, v_proj]"])
    assert cfg.epochs == 1 and cfg.lora_r == 4 and cfg.target_modules == ("q_proj", "v_proj")
    for bad, msg in (("epochs", "KEY=VALUE"), ("epoch=1", "unknown DREAM setting"), ("epochs=0", "epochs"),
                     ("epochs=[", "not YAML")):
        with pytest.raises(ConfigError, match=msg):
            dream_config(s, [bad])
