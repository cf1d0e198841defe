"""Routers sharing one store learn from each other: what one stores reaches the other's memory
(index rows, trust, tier stats) within about a second of polling, on SQLite and PostgreSQL;
ids that commit late (PostgreSQL hands them out before commit) are not missed."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert

from dreamroute import DreamRoute
from dreamroute.config import StoreConfig
from dreamroute.store import schema as T
from dreamroute.store.store import Store
from dreamroute.store.sync import SyncCursor

from .conftest import problem_answers, scripted_backends, scripted_settings


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    return request.getfixturevalue("pg_url")


def until(cond, timeout_s: float = 10.0, every_s: float = 0.05) -> bool:
    """Poll ``cond`` until it holds or ``timeout_s`` passes."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every_s)
    return cond()


def router(tmp_path, db, answers, fast_path=False, **store) -> DreamRoute:
    settings = scripted_settings(tmp_path).model_copy(update={"store": StoreConfig(sync_interval_s=0.2, **store)})
    return DreamRoute(settings, db=db, backends=scripted_backends(answers), fast_path=fast_path)


def test_another_routers_experiences_reach_memory_within_a_second(tmp_path, db):
    items, answers = problem_answers(12)
    a, b = router(tmp_path, db, answers), router(tmp_path, db, answers, sync=True)
    try:
        assert a.store.instance_id != b.store.instance_id
        assert b.start_sync()                               # sync: True (a: the default, off for SQLite)
        before = len(b.memory.index)
        ids = []
        for it in items[:6]:
            ans = a.complete(it.prompt, gold=it.answer, grader="gsm8k")
            ids += [r["id"] for r in a.store.experiences_for_request(ans.request.request_id)]
        t0 = time.monotonic()
        assert until(lambda: all(i in b.memory.exp_rows for i in ids), timeout_s=10.0), b._sync.error
        took = time.monotonic() - t0
        assert took < 3.0, took                              # polled every 0.2 s; ~1 s is the target
        assert len(b.memory.index) == before + len(ids)
        tiers = [r["tier"] for i in ids for r in b.store.experiences(["id", "tier"]) if r["id"] == i]
        assert sum(b.memory.tier_stats[t].n for t in set(tiers)) >= len(tiers)
        for row in b.store.trust_table():                   # the trust rows, reread: every router's updates
            st = b.memory.trust.get(row.model_version_id, row.context)
            assert (st.alpha, st.beta, st.count) == (row.alpha, row.beta, row.count)
        b.stop_sync()
        # b's own answers are not absorbed twice; a's next ones arrive by an explicit sync()
        n_rows = len(b.memory.index)
        own = b.complete(items[6].prompt, gold=items[6].answer, grader="gsm8k")
        mine = len(b.store.experiences_for_request(own.request.request_id))
        theirs = a.complete(items[7].prompt, gold=items[7].answer, grader="gsm8k")
        n_theirs = len(a.store.experiences_for_request(theirs.request.request_id))
        assert b.sync() == n_theirs and b.sync() == 0
        assert len(b.memory.index) == n_rows + mine + n_theirs
        rep = b.store.verify_ledger()
        assert rep.ok and {a.store.instance_id, b.store.instance_id} <= set(rep.chains), rep.problems
    finally:
        a.close()
        b.close()


def test_sync_is_on_by_default_only_for_a_server_url(tmp_path, db):
    items, answers = problem_answers(2)
    dr = router(tmp_path, db, answers)
    try:
        assert dr.start_sync() == db.startswith("postgresql")
    finally:
        dr.close()
    assert getattr(dr, "_sync", None) is None or not dr._sync.running


def test_an_id_that_commits_late_is_not_missed(pg_url):
    """PostgreSQL hands out ids at insert, not commit: id n+1 can be seen before id n commits."""
    me, a, b = Store(pg_url), Store(pg_url), Store(pg_url)
    mv = a.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
    cur = SyncCursor(me, me.instance_id)
    row = dict(T.experience_row({"role": "chosen", "prompt": "late", "tier": "sensory", "context": "novel",
                                 "model_version_id": mv}, "req-late", T.utc_now()), instance_id=a.instance_id)
    with a._write() as conn:                               # a's transaction takes an id and holds it open ...
        late_id = conn.execute(insert(T.experiences).returning(T.experiences.c.id), [row]).scalar_one()
        early = b.record([{"role": "chosen", "prompt": "early", "tier": "sensory", "context": "novel",
                           "model_version_id": mv}], [])[0]   # ... while b's commits with the next id
        assert early > late_id
        assert [r["id"] for r in cur.poll()] == [early] and late_id in cur.gaps
    assert [r["id"] for r in cur.poll()] == [late_id] and not cur.gaps   # found once it committed
    me.record([{"role": "chosen", "prompt": "mine", "tier": "sensory", "context": "novel"}], [])
    assert cur.poll() == [] and cur.poll() == []          # own rows are skipped, nothing twice
    for s in (me, a, b):
        s.close()


def test_verdicts_from_two_routers_on_one_answer_replace_each_other(tmp_path, db):
    """Router a grades an answer a success; router b's user says failure; a's user says success
    again: the answer counts once, and trust ends as it was after the grade (the last verdict in
    the first one's place), whichever router's memory saw what."""
    items, answers = problem_answers(6)
    a, b = router(tmp_path, db, answers), router(tmp_path, db, answers)
    try:
        first = a.complete(items[0].prompt, gold=items[0].answer, grader="gsm8k")
        for it in items[1:4]:
            a.complete(it.prompt, gold=it.answer, grader="gsm8k")
        graded = {(r.model_version_id, r.context): (r.alpha, r.beta, r.count) for r in a.store.trust_table()}
        assert first.outcomes[first.calls.index(first.final)].outcome == "success"
        b.record_outcome(first.request.request_id, "failure")
        moved = {(r.model_version_id, r.context): (r.alpha, r.beta, r.count) for r in b.store.trust_table()}
        assert moved != graded and all(moved[k][2] == graded[k][2] for k in graded)   # replaced, not counted again
        a.record_outcome(first.request.request_id, "success")
        final = {(r.model_version_id, r.context): (r.alpha, r.beta, r.count) for r in a.store.trust_table()}
        for k, (al, be, n) in graded.items():
            assert final[k][0] == pytest.approx(al, abs=1e-9) and final[k][1] == pytest.approx(be, abs=1e-9)
            assert final[k][2] == n
        changed = [k for k in final if moved[k] != graded[k]]
        assert len(changed) == 1                             # the answer's own trust row
        st = a.memory.trust.get(*changed[0])                 # a wrote last: its memory holds the row written
        assert (st.alpha, st.beta, st.count) == final[changed[0]]
        rep = a.store.verify_ledger()
        assert rep.ok, rep.problems
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("judge_on", ["answering", "other"])
def test_a_verdict_given_after_the_other_router_read_the_answer_reaches_its_memory(tmp_path, db, judge_on):
    """An answer stored without a verdict is absorbed as unknown; the user's verdict comes later,
    on the answering router or on the other one: the next poll of the router that did not record it
    sets that row's outcome in its index and its fast path serves the answer."""
    items, answers = problem_answers(4)
    a, b = router(tmp_path, db, answers, fast_path=True), router(tmp_path, db, answers, fast_path=True)
    try:
        it = items[0]
        ans = a.complete(it.prompt)                          # no gold: stored with outcome unknown
        row = next(r for r in a.store.experiences_for_request(ans.request.request_id) if r["role"] != "audit")
        assert b.sync() >= 1 and row["id"] in b.memory.exp_rows
        rb = b.memory.exp_rows[row["id"]]
        assert b.memory.index.outcome[rb] != b.memory.index.outcome[rb]   # NaN: unknown
        judge, other = (a, b) if judge_on == "answering" else (b, a)
        judge.record_outcome(ans.request.request_id, "success", witness="user:test")
        other.sync()
        ro = other.memory.exp_rows[row["id"]]
        assert other.memory.index.outcome[ro] == 1.0
        assert other.cached([{"role": "user", "content": it.prompt}]) is not None   # the fast path has it
    finally:
        a.close()
        b.close()
