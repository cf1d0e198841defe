"""The learned answer judge: features, fitting, and the same state live and rebuilt from the store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dreamroute import DreamRoute
from dreamroute.router.judge import FEATURES, AnswerJudge, answer_features, form_factor
from dreamroute.router.memory import Memory

from .conftest import problem_answers, scripted_backends, scripted_settings


def test_answer_features_by_hand():
    f = dict(zip(FEATURES, answer_features("Tom has 3 apples and 4 pears.", "3 + 4 = 7\nThe answer is 7.",
                                           "7", 0.5, None)))
    assert f["form"] == 0.0 and f["form_known"] == 1.0  # confidence 0.5 without logprobs: not in form
    assert f["log_response_chars"] == pytest.approx(math.log1p(len("3 + 4 = 7\nThe answer is 7.")))
    assert f["log_prompt_numbers"] == pytest.approx(math.log1p(2))
    assert f["log_response_numbers"] == pytest.approx(math.log1p(4))
    assert f["log_response_lines"] == pytest.approx(math.log1p(1))
    assert f["answer_missing"] == 0.0 and f["answer_fractional"] == 0.0 and f["answer_in_prompt"] == 0.0
    assert f["logprob_known"] == 0.0
    g = dict(zip(FEATURES, answer_features("Tom has 3 apples.", "It is 3", "3", 0.9, math.log(0.9))))
    assert g["form"] == 1.0 and g["answer_in_prompt"] == 1.0 and g["mean_logprob"] == pytest.approx(math.log(0.9))


def test_form_factor_undoes_the_logprob():
    assert form_factor(None, None) is None
    assert form_factor(0.5, None) == 0.5
    assert form_factor(0.5 * math.exp(-0.2), -0.2) == pytest.approx(0.5)


def test_judge_learns_which_answers_succeed():
    rng = np.random.default_rng(0)
    judge = AnswerJudge(2, min_fit=40, refit_every=10)
    good = answer_features("q 1 2", "The answer is 3", "3", 1.0, None)
    bad = answer_features("q 1 2", "I think it could be 1 or maybe 2 " * 8, "2", 0.5, None)
    assert judge.predict(0, good) is None  # nothing learned yet
    for _ in range(39):
        judge.add(0, good, 1.0)
    assert not judge.fitted(0)  # below min_fit, and one outcome only
    for k in range(200):
        judge.add(0, good, float(rng.random() < 0.9))
        judge.add(0, bad, float(rng.random() < 0.2))
    assert judge.predict(0, good) > 0.75 and judge.predict(0, bad) < 0.35
    assert judge.predict(1, good) is None  # tiers are separate
    assert 0.4 < judge.base_rate(0) < 0.7
    # naive-Bayes combination: a prior at the base rate leaves the judgement unchanged
    assert float(judge.combine(0, judge.base_rate(0), 0.8)) == pytest.approx(0.8)
    assert judge.recent_features(0, 5).shape == (5, len(FEATURES))


def _judges(mem: Memory, x: np.ndarray):
    return [(mem.judge.predict_many(i, x), mem.next_judge.predict_many(i, x)) for i in range(len(mem.tiers))]


def test_judge_state_is_the_same_live_and_rebuilt_from_the_store(tmp_path):
    items, answers = problem_answers(120)
    settings = scripted_settings(tmp_path)
    backends = scripted_backends(answers, skill=(2, 3, 5))  # sensory and tactical right and wrong
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, seed=3) as dr:
        for it in items:
            dr.complete(it.prompt, gold=it.answer, grader=it.grader, item_key=it.key)
        live = dr.memory
        assert any(live.judge.fitted(i) for i in range(len(live.tiers)))
        x = np.vstack([live.judge.recent_features(i, 30) for i in range(len(live.tiers))])
        # refit the live judges on everything seen, as the rebuild does
        for i in range(len(live.tiers)):
            live.judge.fit(i)
            live.next_judge.fit(i)
        want = _judges(live, x)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, seed=3) as dr2:
        got = _judges(dr2.memory, x)
    for (a, b), (c, d) in zip(want, got):
        for u, v in ((a, c), (b, d)):
            assert (u is None) == (v is None)
            if u is not None:
                np.testing.assert_allclose(u, v, rtol=1e-6)
