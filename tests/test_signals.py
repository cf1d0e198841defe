"""Signals of DESIGN.md ("Signals, defined so they can be measured"): features, the
experience index, novelty, instability, drift, context, SNARC and surprise statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute.config import RouterConfig
from dreamroute.signals.features import (ExperienceIndex, FeatureEncoder, SurpriseStats, classify_context, drift, instability, logistic, novelty, snarc, top_k)

CFG = RouterConfig()
ENC = FeatureEncoder()

PROMPTS = [
    "What is the capital of France?",
    "Compute 17 * 23 and show your steps.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Write a haiku about autumn leaves.",
    "Translate 'good morning' into German.",
    "Which planet is closest to the sun?",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of babysitting.",
    "Explain the difference between TCP and UDP.",
    "What is the capital of Spain?",
    "Compute 19 * 23 and show your steps.",
    "Betty is saving money for a new wallet which costs $100.",
    "List three prime numbers greater than 50.",
    "Who wrote Pride and Prejudice?",
    "Sort these numbers: 5, 3, 9, 1.",
    "Describe photosynthesis in one sentence.",
    "How many legs does a spider have?",
    "Julie is reading a 120-page book.",
    "Name a mammal that can fly.",
]

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,.?", min_size=1, max_size=80).filter(
    lambda s: s.strip())


def dense(m: sp.csr_matrix) -> np.ndarray:
    return np.asarray(m.todense(), dtype=np.float64)


# ---- features ------------------------------------------------------------------------

@given(words)
def test_features_are_l2_normalised(text):
    v = ENC.encode(text)
    assert v.shape == (1, ENC.n_features)
    assert float(np.sqrt((v.data.astype(np.float64) ** 2).sum())) == pytest.approx(1.0, abs=1e-5)
    assert float((v @ v.T).toarray()[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert (v.data >= 0).all()  # cosines between prompts are in [0, 1]


def test_encode_many_matches_encode():
    m = ENC.encode_many(PROMPTS[:5])
    assert m.shape == (5, ENC.n_features)
    for i, p in enumerate(PROMPTS[:5]):
        assert np.allclose(dense(m[i]), dense(ENC.encode(p)))


def test_cosines_separate_related_and_unrelated_texts():
    def cos(a, b):
        return float((ENC.encode(a) @ ENC.encode(b).T).toarray()[0, 0])

    assert cos(PROMPTS[0], PROMPTS[1]) < 0.5
    assert cos(PROMPTS[3], PROMPTS[7]) < 0.5
    assert cos(PROMPTS[0], PROMPTS[8]) > 0.7  # capital of France / Spain
    assert cos("Hello World", "hello world") == pytest.approx(1.0, abs=1e-5)  # lowercased


# ---- experience index ----------------------------------------------------------------

def brute(vecs: list[sp.csr_matrix], q: sp.csr_matrix) -> np.ndarray:
    return dense(sp.vstack(vecs) @ q.T).ravel()


@pytest.mark.parametrize("n_add", [0, 1, 3, 4, 5, 8, 10])
def test_similarities_equal_brute_force_via_add_across_merges(n_add):
    idx = ExperienceIndex(ENC.n_features, merge_every=4)
    vecs = [ENC.encode(p) for p in PROMPTS[:n_add]]
    q0 = ENC.encode(PROMPTS[0])
    for i, v in enumerate(vecs):
        assert idx.add(v, tier=i % 3, outcome=float(i % 2), atp=10 + i, exp_id=100 + i) == i
        # a query after every append sees the new row too
        assert np.allclose(idx.similarities(q0), brute(vecs[:i + 1], q0), atol=1e-6)
    assert len(idx) == n_add
    for q_text in (PROMPTS[0], PROMPTS[9], "something else entirely"):
        q = ENC.encode(q_text)
        sims = idx.similarities(q)
        assert sims.shape == (n_add,)
        if n_add:
            assert np.allclose(sims, brute(vecs, q), atol=1e-6)
    assert list(idx.ids) == [100 + i for i in range(n_add)]
    assert list(idx.tier) == [i % 3 for i in range(n_add)]


def test_similarities_equal_brute_force_mixing_add_many_and_add():
    idx = ExperienceIndex(ENC.n_features, merge_every=4)
    vecs = []
    # tail rows, then a bulk load, then more tail rows across a merge, then another bulk load
    for p in PROMPTS[:3]:
        idx.add(ENC.encode(p), 0, 1.0, 5)
        vecs.append(ENC.encode(p))
    bulk = ENC.encode_many(PROMPTS[3:9])
    idx.add_many(bulk, [1] * 6, [0.0] * 6, [7] * 6, list(range(3, 9)))
    vecs.extend(bulk[i] for i in range(6))
    for p in PROMPTS[9:15]:  # 6 adds with merge_every=4: one merge, 2 left in the tail
        idx.add(ENC.encode(p), 2, math.nan, 9)
        vecs.append(ENC.encode(p))
    bulk2 = ENC.encode_many(PROMPTS[15:])
    idx.add_many(bulk2, [0] * bulk2.shape[0], [1.0] * bulk2.shape[0], [3] * bulk2.shape[0], [0] * bulk2.shape[0])
    vecs.extend(bulk2[i] for i in range(bulk2.shape[0]))
    idx.add(ENC.encode("one more in the tail"), 1, 1.0, 4)
    vecs.append(ENC.encode("one more in the tail"))
    assert len(idx) == len(vecs) == len(PROMPTS) + 1
    for q_text in PROMPTS[::3] + ["one more in the tail"]:
        q = ENC.encode(q_text)
        assert np.allclose(idx.similarities(q), brute(vecs, q), atol=1e-6)
    # the row order is the append order: each prompt is its own nearest row
    for i, p in enumerate(PROMPTS):
        assert int(np.argmax(idx.similarities(ENC.encode(p)))) == i
    assert list(idx.tier) == [0] * 3 + [1] * 6 + [2] * 6 + [0] * bulk2.shape[0] + [1]
    assert np.isnan(idx.outcome[9:15]).all() and not np.isnan(idx.outcome[:9]).any()


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PROMPTS) - 1)),
    st.tuples(st.just("bulk"), st.lists(st.integers(0, len(PROMPTS) - 1), max_size=5)),
    st.tuples(st.just("query"), st.integers(0, len(PROMPTS) - 1)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(1, 6))
def test_similarities_equal_brute_force_for_any_interleaving(operations, merge_every):
    """Queries between appends (as the router does) see every row added so far, in order."""
    idx = ExperienceIndex(ENC.n_features, merge_every=merge_every)
    vecs: list[sp.csr_matrix] = []
    for op, arg in operations:
        if op == "add":
            assert idx.add(ENC.encode(PROMPTS[arg]), arg % 3, 1.0, 1, exp_id=arg) == len(vecs)
            vecs.append(ENC.encode(PROMPTS[arg]))
        elif op == "bulk":
            m = ENC.encode_many([PROMPTS[i] for i in arg])
            idx.add_many(m, [i % 3 for i in arg], [0.0] * len(arg), [1] * len(arg), arg)
            vecs.extend(m[i] for i in range(len(arg)))
        else:
            q = ENC.encode(PROMPTS[arg])
            sims = idx.similarities(q)
            assert sims.shape == (len(vecs),)
            if vecs:
                assert np.allclose(sims, brute(vecs, q), atol=1e-5)
        assert len(idx) == len(vecs)


def test_add_many_with_no_rows_is_a_no_op_and_empty_index_has_no_similarities():
    idx = ExperienceIndex(ENC.n_features, merge_every=4)
    idx.add_many(sp.csr_matrix((0, ENC.n_features), dtype=np.float32), [], [], [], [])
    assert len(idx) == 0
    assert idx.similarities(ENC.encode("x y z")).shape == (0,)
    assert novelty(idx.similarities(ENC.encode("x y z"))) == 1.0


def test_set_outcome():
    idx = ExperienceIndex(ENC.n_features, merge_every=4)
    idx.add(ENC.encode("a b c"), 0, math.nan, 1)
    idx.set_outcome(0, 1.0)
    assert idx.outcome[0] == 1.0


@settings(max_examples=200)
@given(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=0, max_size=40),
       st.data(), st.integers(1, 10))
def test_top_k_returns_the_k_best_within_the_mask(values, data, k):
    sims = np.asarray(values, dtype=np.float32)
    mask = np.asarray(data.draw(st.lists(st.booleans(), min_size=len(sims), max_size=len(sims))), dtype=bool)
    rows = top_k(sims, mask, k)
    allowed = np.flatnonzero(mask)
    assert len(rows) == min(k, len(allowed))
    assert len(set(rows.tolist())) == len(rows)
    assert set(rows.tolist()) <= set(allowed.tolist())
    if len(rows):
        left_out = np.setdiff1d(allowed, rows)
        if len(left_out):
            assert sims[rows].min() >= sims[left_out].max()
    # no mask: over all rows
    rows_all = top_k(sims, None, k)
    assert len(rows_all) == min(k, len(sims))
    if len(rows_all) and len(rows_all) < len(sims):
        assert sims[rows_all].min() >= np.delete(sims, rows_all).max()


# ---- novelty, instability, drift -----------------------------------------------------

@given(st.lists(st.floats(0, 1, allow_nan=False, width=32), min_size=1, max_size=50))
def test_novelty_is_one_minus_max_cosine(values):
    sims = np.asarray(values, dtype=np.float32)
    assert novelty(sims) == pytest.approx(1.0 - float(sims.max()), abs=1e-6)
    assert 0.0 <= novelty(sims) <= 1.0


def test_novelty_of_empty_memory_is_one_and_of_a_stored_prompt_is_zero():
    assert novelty(np.zeros(0, dtype=np.float32)) == 1.0
    idx = ExperienceIndex(ENC.n_features, merge_every=4)
    for p in PROMPTS[:6]:
        idx.add(ENC.encode(p), 0, 1.0, 1)
    assert novelty(idx.similarities(ENC.encode(PROMPTS[2]))) == pytest.approx(0.0, abs=1e-5)
    assert novelty(idx.similarities(ENC.encode("zzqx vvbn"))) > 0.9


@pytest.mark.parametrize("outcomes,expected", [
    ([], 0.0),
    ([1.0], 0.0),
    ([1.0, 0.0], 0.0),  # fewer than 3
    ([1.0, 0.0, math.nan, math.nan], 0.0),  # 2 known
    ([1.0, 1.0, 1.0], 0.0),
    ([1.0, 0.0, 1.0, 0.0], 0.25),
    ([1.0, 0.0, 0.0], 2.0 / 9.0),
    ([1.0, math.nan, 0.0, 0.0, math.nan], 2.0 / 9.0),
])
def test_instability_table(outcomes, expected):
    assert instability(np.asarray(outcomes, dtype=np.float32)) == pytest.approx(expected, abs=1e-6)


@given(st.lists(st.one_of(st.sampled_from([0.0, 1.0, math.nan]), st.floats(0, 1)), max_size=40))
def test_instability_is_variance_of_known_outcomes(values):
    arr = np.asarray(values, dtype=np.float64)
    known = arr[~np.isnan(arr)]
    u = instability(arr)
    if len(known) < 3:
        assert u == 0.0
    else:
        assert u == pytest.approx(float(np.var(known)), abs=1e-9)
    assert 0.0 <= u <= 0.25 + 1e-9


@given(words, words)
def test_drift_in_unit_interval_and_matches_cosine(a, b):
    va, vb = ENC.encode(a), ENC.encode(b)
    d = drift(va, vb)
    assert 0.0 <= d <= 1.0
    assert d == pytest.approx(1.0 - float((va @ vb.T).toarray()[0, 0]), abs=1e-5)
    assert drift(va, va) == pytest.approx(0.0, abs=1e-5)
    assert drift(va, None) == 0.0


def test_drift_first_turn_is_zero_and_unrelated_turns_drift():
    assert drift(ENC.encode(PROMPTS[0]), None) == 0.0
    assert drift(ENC.encode(PROMPTS[0]), ENC.encode(PROMPTS[1])) > 0.5


# ---- context -------------------------------------------------------------------------

# (n, u, d, surprise_z, expected) with τn 0.6, τu 0.2, τd 0.5, τs 1.5
CONTEXT_CASES = [
    (0.0, 0.0, 0.0, None, "stable"),
    (0.59, 0.19, 0.49, 1.49, "stable"),
    (0.6, 0.0, 0.0, None, "novel"),  # thresholds are inclusive
    (0.0, 0.2, 0.0, None, "unstable"),
    (0.0, 0.0, 0.5, None, "moving"),
    (0.0, 0.0, 0.0, 1.5, "unstable"),
    (0.0, 0.0, 0.0, -5.0, "stable"),
    (0.9, 0.25, 0.9, 3.0, "novel"),  # novel beats everything
    (0.9, 0.0, 0.0, 3.0, "novel"),
    (0.5, 0.25, 0.9, None, "unstable"),  # unstable beats moving
    (0.5, 0.0, 0.9, 2.0, "unstable"),  # surprise alone beats moving
    (0.5, 0.1, 0.9, 1.4, "moving"),
    (0.5, 0.1, 0.9, None, "moving"),  # missing surprise never makes a turn unstable
    (0.5, 0.1, 0.1, None, "stable"),
    (1.0, 0.0, 0.0, None, "novel"),
]


@pytest.mark.parametrize("n,u,d,z,expected", CONTEXT_CASES)
def test_classify_context_table(n, u, d, z, expected):
    assert classify_context(n, u, d, z, CFG) == expected


def test_classify_context_uses_the_config_thresholds():
    cfg = RouterConfig(tau_novel=0.3, tau_unstable=0.05, tau_drift=0.1, tau_surprise=0.5)
    assert classify_context(0.35, 0.0, 0.0, None, cfg) == "novel"
    assert classify_context(0.2, 0.06, 0.0, None, cfg) == "unstable"
    assert classify_context(0.2, 0.0, 0.0, 0.6, cfg) == "unstable"
    assert classify_context(0.2, 0.0, 0.15, None, cfg) == "moving"
    assert classify_context(0.35, 0.0, 0.0, None, CFG) == "stable"


def reference_context(n, u, d, z, cfg):
    if n >= cfg.tau_novel:
        return "novel"
    if u >= cfg.tau_unstable or (z is not None and z >= cfg.tau_surprise):
        return "unstable"
    if d >= cfg.tau_drift:
        return "moving"
    return "stable"


@settings(max_examples=500)
@given(st.floats(0, 1), st.floats(0, 0.25), st.floats(0, 1),
       st.one_of(st.none(), st.floats(-10, 10)))
def test_classify_context_rule_order(n, u, d, z):
    ctx = classify_context(n, u, d, z, CFG)
    assert ctx == reference_context(n, u, d, z, CFG)
    # the properties behind the rule order, stated separately
    if n >= CFG.tau_novel:
        assert ctx == "novel"
    elif ctx == "novel":
        pytest.fail("novel without n ≥ τn")
    if ctx in ("moving", "stable"):
        assert u < CFG.tau_unstable and (z is None or z < CFG.tau_surprise)
    if ctx == "stable":
        assert d < CFG.tau_drift
    # missing surprise never makes a turn unstable on its own
    if u < CFG.tau_unstable:
        assert classify_context(n, u, d, None, CFG) != "unstable"


# ---- SNARC ---------------------------------------------------------------------------

any_float = st.floats(allow_nan=False)  # includes ±inf and huge magnitudes


@settings(max_examples=500)
@given(st.one_of(st.none(), any_float), st.floats(-5, 5, allow_nan=False), any_float,
       st.one_of(st.none(), st.floats(-3, 3, allow_nan=False)), st.floats(-3, 3, allow_nan=False))
def test_snarc_components_and_salience_in_unit_interval(z, n, priority, reward, conflict):
    s = snarc(z, n, priority, reward, conflict, CFG.snarc_weights)
    for v in (s.s, s.n, s.a, s.r, s.c, s.salience):
        assert 0.0 <= v <= 1.0 and not math.isnan(v)
    w = CFG.snarc_weights
    expected = (w["S"] * s.s + w["N"] * s.n + w["A"] * s.a + w["R"] * s.r + w["C"] * s.c) / sum(w.values())
    assert s.salience == pytest.approx(expected)
    assert s.a == pytest.approx(min(1.0, max(0.0, priority)))
    assert s.r == (0.5 if reward is None else pytest.approx(min(1.0, max(0.0, reward))))


def test_snarc_default_weights_are_the_design_ones():
    assert CFG.snarc_weights == {"S": 0.25, "N": 0.20, "A": 0.10, "R": 0.20, "C": 0.25}
    s = snarc(None, 0.4, 0.0, 1.0, 0.0, CFG.snarc_weights)
    assert s.s == 0.5  # missing surprise
    assert s.salience == pytest.approx(0.25 * 0.5 + 0.20 * 0.4 + 0.10 * 0.0 + 0.20 * 1.0 + 0.25 * 0.0)
    s = snarc(0.0, 0.0, 1.0, None, 1.0, CFG.snarc_weights)
    assert (s.s, s.a, s.r, s.c) == (0.5, 1.0, 0.5, 1.0)
    assert s.salience == pytest.approx(0.25 * 0.5 + 0.10 + 0.20 * 0.5 + 0.25)


def test_snarc_surprise_is_the_logistic_of_z():
    assert snarc(2.0, 0, 0, 0, 0, CFG.snarc_weights).s == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert snarc(-1.0, 0, 0, 0, 0, CFG.snarc_weights).s == pytest.approx(1 / (1 + math.exp(1.0)))
    assert snarc(1e308, 0, 0, 0, 0, CFG.snarc_weights).s == pytest.approx(1.0)
    assert snarc(-1e308, 0, 0, 0, 0, CFG.snarc_weights).s == pytest.approx(0.0, abs=1e-20)
    assert logistic(float("inf")) <= 1.0 and logistic(float("-inf")) >= 0.0
    # salience grows with each component
    base = snarc(0.0, 0.3, 0.2, 0.5, 0.1, CFG.snarc_weights).salience
    assert snarc(2.0, 0.3, 0.2, 0.5, 0.1, CFG.snarc_weights).salience > base
    assert snarc(0.0, 0.3, 0.2, 0.5, 0.9, CFG.snarc_weights).salience > base


# ---- surprise statistics -------------------------------------------------------------

@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=0, max_size=60), st.floats(-50, 50))
def test_surprise_z_matches_numpy(xs, x):
    stats = SurpriseStats()
    for v in xs:
        stats.add(v)
    assert stats.n == len(xs)
    z = stats.z(x)
    if len(xs) < 5:
        assert z is None
        return
    arr = np.asarray(xs, dtype=np.float64)
    sd = float(arr.std(ddof=1))
    assert stats.mean == pytest.approx(float(arr.mean()), abs=1e-9)
    assert stats.std == pytest.approx(sd, rel=1e-6, abs=1e-9)
    if sd <= 1e-6:
        return  # no spread: z is undefined (None) or the ratio is ill-conditioned
    assert z == pytest.approx((x - float(arr.mean())) / sd, rel=1e-6, abs=1e-6)


def test_surprise_z_needs_five_observations():
    stats = SurpriseStats()
    for v in (1.0, 2.0, 3.0, 4.0):
        stats.add(v)
        assert stats.z(10.0) is None
    stats.add(5.0)
    assert stats.z(3.0) == pytest.approx(0.0)
    assert stats.z(10.0) == pytest.approx((10.0 - 3.0) / np.std([1, 2, 3, 4, 5], ddof=1))
    flat = SurpriseStats()
    for _ in range(10):
        flat.add(2.0)
    assert flat.z(5.0) is None  # no spread
