"""One verdict per response: a changed verdict replaces the earlier one, so any sequence of
verdicts on a response leaves trust as if only the last had been given, where the first was
(router/feedback.py, trust.replace_reward, store/verdicts.py)."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.errors import FeedbackConflictError
from dreamroute.store import schema as T
from dreamroute.store.ledger import canonical_json, entry_hash
from dreamroute.store.migrations import MIGRATIONS, sqlite_engine
from dreamroute.signals.trust import TrustBook, replace_reward

from .conftest import TIERS, scripted_settings

PROMPTS = ["What is 2 + 2?", "Name a prime above 10.", "Spell 'river' backwards.", "Is 91 prime?"]
verdict_values = st.one_of(st.sampled_from(["success", "failure"]),
                           st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
witnesses = st.sampled_from(["user", "user:api", "verifier"])


def reward_of(v) -> float:
    return {"success": 1.0, "failure": 0.0}[v] if isinstance(v, str) else float(v)


def outcome_of(v) -> str:
    return "success" if reward_of(v) >= 0.5 else "failure"


# ------------------------------------------------------------------ the rule, on the posterior alone

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0.0, 1.0, allow_nan=False)), min_size=1, max_size=40),
       st.floats(min_value=0.5, max_value=1.0, allow_nan=False))
def test_replacing_a_reward_equals_observing_only_the_last_in_the_first_place(events, gamma):
    """Slot k's verdicts, interleaved with the others', give the posterior of one observation per
    slot (at its first verdict's place) with the slot's last reward."""
    book, slots = TrustBook(gamma=gamma), {}
    for k, r in events:
        if k not in slots:
            book.observe(1, "stable", r)
            slots[k] = [book.get(1, "stable").count, r]
        else:
            count, old = slots[k]
            book.replace(1, "stable", old, r, book.get(1, "stable").count - count)
            slots[k][1] = r
    first_order = list(dict.fromkeys(k for k, _ in events))
    ref = TrustBook(gamma=gamma)
    for k in first_order:
        ref.observe(1, "stable", slots[k][1])
    got, want = book.get(1, "stable"), ref.get(1, "stable")
    assert got.count == want.count == len(first_order)
    assert got.alpha == pytest.approx(want.alpha, rel=1e-9, abs=1e-9)
    assert got.beta == pytest.approx(want.beta, rel=1e-9, abs=1e-9)


def test_replace_reward_weighs_by_the_forgetting_since_and_rejects_bad_input():
    # a success 3 updates ago with γ = 0.5 weighs 0.125 now: turning it into a failure moves 0.125
    assert replace_reward(3.0, 2.0, 1.0, 0.0, 0.5 ** 3) == pytest.approx((2.875, 2.125))
    assert replace_reward(1.0, 5.0, 1.0, 0.0, 1.0) == (1.0, 6.0)           # clipped at the prior
    for bad in ((1.5, 0.0, 1.0), (0.0, -0.1, 1.0), (0.0, 1.0, 1.2)):
        with pytest.raises(ValueError):
            replace_reward(2.0, 2.0, *bad)


# ------------------------------------------------------------------ through feedback and the store

def backends():
    return {t: ScriptedBackend(f"sha-{t}", lambda m, t=t: f"{t}: the answer is 4.") for t in TIERS}


def answered(root: Path) -> tuple[DreamRoute, list[str]]:
    dr = DreamRoute(scripted_settings(root), db=root / "s.db", backends=backends(), policy="always:tactical")
    return dr, [dr.complete(p).request.request_id for p in PROMPTS]


def trust_rows(dr: DreamRoute) -> dict:
    return {(r.model_version_id, r.context): (r.alpha, r.beta, r.count) for r in dr.store.trust_table()}


def assert_same_trust(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][2] == b[k][2], k
        assert a[k][:2] == pytest.approx(b[k][:2], rel=1e-9, abs=1e-9), k


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(PROMPTS) - 1), verdict_values, witnesses), min_size=1, max_size=12))
def test_any_sequence_of_verdicts_leaves_trust_as_if_only_the_last_were_given(events):
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        dr, ids = answered(Path(d1))
        last: dict[int, tuple] = {}       # response -> (its first verdict's place, last verdict, witness)
        held: dict[int, tuple] = {}       # response -> (witness, outcome) it holds
        for place, (i, v, w) in enumerate(events):
            before = trust_rows(dr)
            if held.get(i) == (w, outcome_of(v)):
                with pytest.raises(FeedbackConflictError):
                    dr.record_outcome(ids[i], v, witness=w)
                assert trust_rows(dr) == before                  # refused: nothing changed
                continue
            dr.record_outcome(ids[i], v, witness=w)
            held[i] = (w, outcome_of(v))
            last[i] = (last[i][0] if i in last else place, v, w)
            for (vid, ctx), (a, b, n) in trust_rows(dr).items():   # memory and store agree
                s = dr.memory.trust.get(vid, ctx)
                assert (s.alpha, s.beta, s.count) == (a, b, n)
        ref, ref_ids = answered(Path(d2))
        for i, (_, v, w) in sorted(last.items(), key=lambda kv: kv[1][0]):
            ref.record_outcome(ref_ids[i], v, witness=w)
        assert_same_trust(trust_rows(dr), trust_rows(ref))
        assert dr.store.verify_ledger().ok and ref.store.verify_ledger().ok
        for i, (_, v, w) in last.items():                        # the stored verdict is the last one
            row = dr.store.experiences_for_request(ids[i])[-1]
            assert (row["outcome"], row["witness"]) == (outcome_of(v), w)
        dr.close()
        ref.close()


@pytest.mark.parametrize("flips", [["failure"], ["failure", "success"], [0.2, 0.9, "failure"]])
def test_a_graded_answer_then_user_verdicts_equal_the_last_verdict_at_learn_time(tmp_path, flips):
    """The first verdict is the grade at learn time; the user's later ones replace it there, with
    other graded requests in between (so the slot has been forgotten a little since)."""
    def run(root, gold_first, verdicts):
        dr = DreamRoute(scripted_settings(root), db=root / "s.db", backends=backends(), policy="always:tactical")
        first = dr.complete(PROMPTS[0], gold=gold_first, grader="gsm8k")
        for p in PROMPTS[1:]:
            dr.complete(p, gold="4", grader="gsm8k")
        for v in verdicts:
            dr.record_outcome(first.request.request_id, v)
        rows = trust_rows(dr)
        assert dr.store.verify_ledger().ok
        dr.close()
        return rows
    flipped = run(tmp_path / "a", "4", flips)                    # graded a success, then flipped
    last = reward_of(flips[-1])
    if last in (0.0, 1.0):   # the same as a grade of the last verdict at learn time
        assert_same_trust(flipped, run(tmp_path / "b", "4" if last == 1.0 else "5", []))
    graded_only = run(tmp_path / "c", "4", [])
    moved = [k for k in flipped if flipped[k] != graded_only[k]]
    assert len(moved) == (0 if last == 1.0 else 1)          # only the response's own trust row moves
    assert all(flipped[k][2] == graded_only[k][2] for k in flipped)   # and no count was added anywhere


def test_each_correction_is_a_ledger_entry_of_its_own(tmp_path):
    dr, ids = answered(tmp_path)
    n0 = len(dr.store.ledger_entries())
    dr.record_outcome(ids[0], "success")
    dr.record_outcome(ids[1], "success")
    dr.record_outcome(ids[0], 0.25, witness="user:api")
    entries = dr.store.ledger_entries()
    assert len(entries) == n0 + 3
    fix = entries[-1]["delta"]
    assert fix["reward"] == 0.25 and fix["replaces"]["reward"] == 1.0 and fix["replaces"]["witness"] == "user"
    assert fix["replaces"]["weight"] == pytest.approx(dr.memory.trust.gamma)    # one update since
    assert fix["count_after"] == entries[-2]["delta"]["count_after"]             # not a new observation
    assert "replaces success by user" in fix["reason"]
    with pytest.raises(FeedbackConflictError):                 # the same outcome from the same witness
        dr.record_outcome(ids[0], 0.3, witness="user:api")
    dr.record_outcome(ids[0], 0.3, witness="user")            # another witness's verdict replaces it
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("SELECT reward, witness FROM verdicts WHERE experience_id = ?",
                       (dr.store.experiences_for_request(ids[0])[-1]["id"],)).fetchall() == [(0.3, "user")]
    con.close()
    dr.close()


def test_a_response_judged_before_migration_8_is_replaced_too(tmp_path):
    """An oldest-schema store: a success graded by the old code (no verdicts row, no reward in its
    ledger entry); a user's failure afterwards replaces it instead of counting again."""
    path = tmp_path / "old.db"
    engine = sqlite_engine(path)
    version, name, first = MIGRATIONS[0]
    with engine.execution_options(dreamroute_write=True).begin() as conn:
        T.migrations_table.create(conn)
        first(conn)
        conn.execute(T.migrations_table.insert().values(version=version, name=name, applied_at=T.utc_now()))
    engine.dispose()
    now, prev, chain = T.utc_now(), T.GENESIS_HASH, []
    for seq, (entity, action, delta, wit) in enumerate([
        ("model_version:1", "model.activate", {"tier": "tactical", "to": "active", "retired": None}, ["config"]),
        ("model_version:1/novel", "trust.update",
         {"alpha_before": 1.0, "beta_before": 1.0, "alpha_after": 2.0, "beta_after": 1.0, "count_after": 1,
          "trust_before": 0.5, "trust_after": 2 / 3, "reason": "chosen success", "experience_id": 1},
         ["ground_truth"]),
    ], start=1):
        h = entry_hash(prev, seq, now, entity, action, delta, wit)
        chain.append((seq, now, entity, action, canonical_json(delta), canonical_json(wit), prev, h))
        prev = h
    row = T.experience_row(dict(role="chosen", prompt=PROMPTS[0], tier="tactical", context="novel",
                                model_version_id=1, response="tactical: the answer is 4.", outcome="success",
                                witness="ground_truth"), "req-1", now)
    for late in ("surprise_tier", "messages_hash", "finish_reason", "messages_hash_v1", "instance_id"):
        row.pop(late)
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT INTO model_versions (id, tier, identity, name, status, created_at) "
                    "VALUES (1, 'tactical', 'sha-tactical', 'scripted-tactical', 'active', ?)", (now,))
        con.execute("INSERT INTO trust VALUES (1, 'novel', 2.0, 1.0, 1, ?)", (now,))
        con.execute(f"INSERT INTO experiences ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))
        con.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?)", chain)
    con.close()
    with DreamRoute(scripted_settings(tmp_path), db=path, backends=backends(), policy="always:tactical") as dr:
        assert dr.memory.versions["tactical"] == 1
        dr.record_outcome("req-1", "failure")
        t = dr.store.get_trust(1, "novel")
        assert (t.alpha, t.beta, t.count) == (1.0, 2.0, 1)        # as if only the failure was given
        assert dr.store.verify_ledger().ok


def test_feedback_on_a_retired_versions_answer_starts_from_its_stored_trust(tmp_path):
    settings = scripted_settings(tmp_path)
    db = tmp_path / "s.db"
    with DreamRoute(settings, db=db, backends=backends(), policy="always:tactical") as dr:
        old = dr.complete(PROMPTS[0], gold="4", grader="gsm8k")
        dr.complete(PROMPTS[1], gold="4", grader="gsm8k")
        vid = dr.memory.versions["tactical"]
        ctx = old.decision.context
        stored = dr.store.get_trust(vid, ctx)
    b2 = backends()
    b2["tactical"] = ScriptedBackend("sha-tactical-v2", lambda m: "v2 says 4")
    with DreamRoute(settings, db=db, backends=b2, policy="always:tactical") as dr:   # tactical's model changed
        assert dr.memory.versions["tactical"] != vid
        dr.record_outcome(old.request.request_id, "failure")
        t = dr.store.get_trust(vid, ctx)
        assert t.count == stored.count and t.alpha < stored.alpha and t.beta > stored.beta
        assert dr.store.verify_ledger().ok
