"""Trust: the Beta posterior with forgetting (DESIGN.md "Starting defaults"), as properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute.signals.trust import TrustBook, TrustState, forget, mean, update

rewards = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
reward_seqs = st.lists(rewards, min_size=0, max_size=200)
binary_seqs = st.lists(st.sampled_from([0.0, 1.0]), min_size=0, max_size=200)
gammas = st.floats(min_value=0.5, max_value=1.0, allow_nan=False, exclude_min=True)
gammas_lt1 = st.floats(min_value=0.5, max_value=0.999, allow_nan=False)
# α, β reachable from the Beta(1, 1) prior: at least the prior
posterior = st.floats(min_value=1.0, max_value=1e6, allow_nan=False)


def run(seq, gamma, prior=(1.0, 1.0)):
    a, b = prior
    for r in seq:
        a, b = update(a, b, r, gamma, prior)
    return a, b


@given(binary_seqs)
def test_gamma_one_is_plain_beta_counting(seq):
    a, b = run(seq, 1.0)
    successes = sum(seq)
    assert a == pytest.approx(1.0 + successes, abs=1e-9)
    assert b == pytest.approx(1.0 + len(seq) - successes, abs=1e-9)


@given(reward_seqs)
def test_gamma_one_with_fractional_rewards_adds_r_and_one_minus_r(seq):
    a, b = run(seq, 1.0)
    assert a == pytest.approx(1.0 + math.fsum(seq), abs=1e-9)
    assert b == pytest.approx(1.0 + math.fsum(1.0 - r for r in seq), abs=1e-9)


def test_update_forgets_before_adding():
    # α, β ← 1 + γ(α − 1), 1 + γ(β − 1), then α += r, β += 1 − r
    a, b = update(11.0, 3.0, 1.0, 0.5)
    assert (a, b) == pytest.approx((1.0 + 0.5 * 10.0 + 1.0, 1.0 + 0.5 * 2.0))
    a, b = update(11.0, 3.0, 0.25, 0.9)
    assert (a, b) == pytest.approx((1.0 + 9.0 + 0.25, 1.0 + 1.8 + 0.75))


@given(posterior, posterior, gammas)
def test_forgetting_pulls_toward_the_prior(a, b, gamma):
    a2, b2 = forget(a, b, gamma)
    assert abs(a2 - 1.0) <= abs(a - 1.0) + 1e-12
    assert abs(b2 - 1.0) <= abs(b - 1.0) + 1e-12
    # and by exactly the factor γ
    assert a2 - 1.0 == pytest.approx(gamma * (a - 1.0), rel=1e-12, abs=1e-12)
    assert b2 - 1.0 == pytest.approx(gamma * (b - 1.0), rel=1e-12, abs=1e-12)


@given(st.floats(0.1, 100.0), st.floats(0.1, 100.0), st.floats(0.1, 5.0), st.floats(0.1, 5.0), gammas)
def test_forgetting_toward_a_general_prior(a, b, a0, b0, gamma):
    a2, b2 = forget(a, b, gamma, (a0, b0))
    assert abs(a2 - a0) <= abs(a - a0) + 1e-9
    assert abs(b2 - b0) <= abs(b - b0) + 1e-9


@given(reward_seqs, gammas)
def test_mean_in_open_unit_interval_and_posterior_at_least_prior(seq, gamma):
    a, b = run(seq, gamma)
    assert a >= 1.0 - 1e-12 and b >= 1.0 - 1e-12
    m = mean(a, b)
    assert 0.0 < m < 1.0
    assert TrustState(a, b).mean == pytest.approx(m)


@given(reward_seqs, gammas_lt1)
def test_effective_sample_size_bounded_by_window(seq, gamma):
    a, b = run(seq, gamma)
    ess = a + b - 2.0
    assert ess <= 1.0 / (1.0 - gamma) + 1e-6
    # and it is exactly the geometric sum (1 − γ^n) / (1 − γ) from the prior
    assert ess == pytest.approx((1.0 - gamma ** len(seq)) / (1.0 - gamma), rel=1e-6, abs=1e-9)


def test_effective_sample_size_grows_without_bound_with_gamma_one():
    a, b = run([1.0, 0.0] * 500, 1.0)
    assert a + b - 2.0 == pytest.approx(1000.0)


@pytest.mark.parametrize("gamma", [0.995, 0.98, 0.9])
def test_mean_tracks_recent_outcomes(gamma):
    # 1000 successes then 600 failures: with forgetting the mean follows the
    # recent failures; plain counting would still say 1001 / 1602 ≈ 0.62.
    seq = [1.0] * 1000 + [0.0] * 600
    a, b = run(seq, gamma)
    assert mean(a, b) < 0.1
    a1, b1 = run(seq, 1.0)
    assert mean(a1, b1) > 0.6
    # and back again
    for _ in range(600):
        a, b = update(a, b, 1.0, gamma)
    assert mean(a, b) > 0.9


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf")])
def test_invalid_gamma_raises(gamma):
    with pytest.raises(ValueError):
        forget(2.0, 3.0, gamma)
    with pytest.raises(ValueError):
        update(2.0, 3.0, 1.0, gamma)


@pytest.mark.parametrize("reward", [-0.01, 1.01, -1.0, 2.0, float("nan"), float("inf"), float("-inf")])
def test_invalid_reward_raises(reward):
    with pytest.raises(ValueError):
        update(2.0, 3.0, reward, 0.995)


def test_invalid_reward_leaves_trustbook_unchanged():
    book = TrustBook(gamma=0.9)
    book.observe(1, "stable", 1.0)
    with pytest.raises(ValueError):
        book.observe(1, "stable", 1.5)
    st_ = book.get(1, "stable")
    assert st_.count == 1 and st_.alpha == pytest.approx(2.0)


@given(st.lists(st.tuples(st.sampled_from([1, 2]), st.sampled_from(["stable", "novel"]), rewards), max_size=60))
def test_trustbook_observe_returns_before_and_after(events):
    book = TrustBook(prior=(1.0, 1.0), gamma=0.99)
    counts: dict = {}
    for vid, ctx, r in events:
        expected_before = book.get(vid, ctx)
        before, after = book.observe(vid, ctx, r)
        assert (before.alpha, before.beta, before.count) == (
            expected_before.alpha, expected_before.beta, expected_before.count)
        assert after.count == before.count + 1
        assert (after.alpha, after.beta) == pytest.approx(update(before.alpha, before.beta, r, 0.99))
        stored = book.get(vid, ctx)
        assert (stored.alpha, stored.beta, stored.count) == (after.alpha, after.beta, after.count)
        counts[(vid, ctx)] = counts.get((vid, ctx), 0) + 1
    assert {k: s.count for k, s in book.items()} == counts


def test_trustbook_fresh_state_is_the_prior_and_keys_are_independent():
    book = TrustBook(prior=(2.0, 3.0), gamma=0.5)
    fresh = book.get(7, "novel")
    assert (fresh.alpha, fresh.beta, fresh.count) == (2.0, 3.0, 0)
    before, after = book.observe(7, "novel", 1.0)
    assert (before.alpha, before.beta, before.count) == (2.0, 3.0, 0)
    assert (after.alpha, after.beta, after.count) == pytest.approx((3.0, 3.0, 1))
    # another context or version is untouched
    assert book.get(7, "stable").count == 0 and book.get(8, "novel").count == 0
    # forgetting is toward the book's prior, not Beta(1, 1)
    _, after2 = book.observe(7, "novel", 0.0)
    assert (after2.alpha, after2.beta) == pytest.approx((2.0 + 0.5 * 1.0, 3.0 + 0.0 + 1.0))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.0, 8.0), (30.0, 5.0), (0.5, 0.5)])
def test_thompson_draws_have_the_posterior_mean(alpha, beta):
    rng = np.random.default_rng(12345)
    state = TrustState(alpha, beta, 0)
    draws = np.array([state.sample(rng) for _ in range(4000)])
    assert np.all((draws >= 0.0) & (draws <= 1.0))
    assert draws.mean() == pytest.approx(alpha / (alpha + beta), abs=0.02)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    assert draws.var() == pytest.approx(var, rel=0.15, abs=1e-3)


def test_thompson_draws_are_reproducible_with_a_seed():
    s = TrustState(3.0, 4.0)
    a = [s.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r = np.random.default_rng(7)
    assert len({s.sample(r) for _ in range(5)}) == 5


@settings(max_examples=50)
@given(reward_seqs, gammas)
def test_trustbook_matches_functional_update(seq, gamma):
    book = TrustBook(gamma=gamma)
    for r in seq:
        book.observe(0, "stable", r)
    a, b = run(seq, gamma)
    s = book.get(0, "stable")
    assert (s.alpha, s.beta, s.count) == (pytest.approx(a), pytest.approx(b), len(seq))
