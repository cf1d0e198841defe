"""Group commit (router/commit.py, Store.record_many): requests that finish together share one
transaction; each is answered only once its records are committed and learned, in commit order;
one bad request fails only itself; the store holds what one record() per request leaves."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dreamroute import DreamRoute
from dreamroute.errors import StoreError
from dreamroute.router.commit import GroupCommit
from dreamroute.router.types import Request
from dreamroute.store.store import Store

from .conftest import problem_answers, scripted_backends, scripted_settings
from .test_store import exp, update


def test_writes_that_arrive_during_a_commit_share_the_next_and_are_applied_in_its_order():
    batches, applied, lock = [], [], threading.RLock()

    def write(payloads):
        time.sleep(0.02)                      # an fsync
        batches.append(list(payloads))
        return [p * 10 for p in payloads]

    def apply(p, res):
        assert lock._is_owned()               # learned under the lock, after the commit
        applied.append(p)
        return res + 1

    gc = GroupCommit(write, apply, lock)
    with ThreadPoolExecutor(max_workers=32) as pool:
        got = list(pool.map(gc.submit, range(64)))
    assert got == [p * 10 + 1 for p in range(64)]
    assert sorted(p for b in batches for p in b) == list(range(64))        # each written once
    assert applied == [p for b in batches for p in b]                      # in commit order
    assert gc.items == 64 and gc.commits == len(batches) < 64 / 4          # batched
    assert max(len(b) for b in batches) > 1


def test_a_failing_payload_fails_only_itself():
    lock = threading.RLock()
    started = threading.Event()

    def write(payloads):
        if 0 in payloads:                     # the first leader holds the others back a while
            started.set()
            time.sleep(0.05)
        if "bad" in payloads:
            raise StoreError("bad row")
        return list(payloads)

    gc = GroupCommit(write, lambda p, r: r, lock)
    out = {}

    def one(p):
        try:
            out[p] = gc.submit(p)
        except StoreError as e:
            out[p] = e

    first = threading.Thread(target=one, args=(0,))
    first.start()
    started.wait(5)
    rest = [threading.Thread(target=one, args=(p,)) for p in (1, "bad", 2)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(10)
    assert out[0] == 0 and out[1] == 1 and out[2] == 2
    assert isinstance(out["bad"], StoreError)


def test_record_many_leaves_what_one_record_per_call_leaves(tmp_path):
    def calls(mv):
        return [([exp(model_version_id=mv, item_key=f"q{i}"), exp(role="audit", model_version_id=mv)],
                 [update(mv, "novel", (1.0 + i, 1.0), i % 2 == 0, i + 1, 0)]) for i in range(5)] + [([exp()], [])]

    with Store(tmp_path / "one.db") as one, Store(tmp_path / "many.db") as many:
        mv1 = one.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        mv2 = many.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        ids1 = [one.record(e, u) for e, u in calls(mv1)]
        ups = calls(mv2)
        ids2 = many.record_many(ups)
        assert ids1 == ids2
        cols = ["id", "role", "item_key", "tier", "outcome", "model_version_id"]
        assert one.experiences(cols) == many.experiences(cols)
        key = lambda r: (r.model_version_id, r.context, r.alpha, r.beta, r.count)  # noqa: E731
        assert [key(r) for r in one.trust_table()] == [key(r) for r in many.trust_table()]
        strip = lambda es: [(e["entity"], e["action"], e["delta"], e["witnesses"]) for e in es]  # noqa: E731
        assert strip(one.ledger_entries()) == strip(many.ledger_entries())
        assert one.verify_ledger().ok and many.verify_ledger().ok
        last = [u for _, us in ups for u in us][-1]                   # the callers' updates hold the values written
        assert (last.alpha_after, last.beta_after) == (many.trust_table()[0].alpha, many.trust_table()[0].beta)
        with pytest.raises(StoreError):            # one bad call: none of the batch is kept
            many.record_many([([exp()], []), ([exp()], [update(mv2, "novel", (1.0, 1.0), True, 1, 5)])])
        assert many.count_experiences() == one.count_experiences()


def test_concurrent_requests_share_commits_and_each_is_on_record_when_answered(tmp_path):
    items, answers = problem_answers(48, seed=5)
    dr = DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=scripted_backends(answers), seed=1)
    real = dr.store.record_many

    def slow(calls):                         # a slow disk: requests finish while one commits
        time.sleep(0.01)
        return real(calls)

    dr.store.record_many = slow

    def one(i):
        ans = dr.complete(items[i].prompt, gold=items[i].answer, grader="gsm8k")
        rows = dr.store.experiences_for_request(ans.request.request_id)   # committed before answered
        assert len(rows) == len(ans.calls)
        assert all(r["id"] in dr.memory.exp_rows for r in rows)         # and learned
        return ans

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(one, range(len(items))))
    gc = dr.engine.commits
    assert gc.items == len(got) and gc.commits < len(got)
    assert dr.store.count_experiences() == sum(len(a.calls) for a in got)
    assert dr.pacer.n == len(got) and dr.store.verify_ledger().ok
    dr.close()


def test_learning_while_holding_the_state_lock_commits_alone(tmp_path):
    items, answers = problem_answers(2, seed=1)
    dr = DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=scripted_backends(answers), seed=1)
    ans = dr.engine.answer(Request([{"role": "user", "content": items[0].prompt}], grader="gsm8k"))
    done = []
    t = threading.Thread(target=lambda: done.append(_learn_holding(dr, ans)))
    t.start()
    t.join(10)
    assert done and len(done[0]) == len(ans.calls)
    assert dr.engine.commits.commits == 0          # not through the group commit
    dr.close()


def _learn_holding(dr, ans):
    with dr.engine.state:
        return dr.engine.learn(ans, dr.engine.judge(ans, None))


def test_a_failed_write_learns_nothing(tmp_path):
    items, answers = problem_answers(3, seed=2)
    dr = DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=scripted_backends(answers), seed=1)
    dr.complete(items[0].prompt, gold=items[0].answer, grader="gsm8k")
    before = (dict(dr.memory.trust._states), len(dr.memory.index), dr.pacer.n, dr.store.count_experiences())

    def broken(calls):
        raise StoreError("disk full")

    dr.store.record_many = broken
    with pytest.raises(StoreError, match="disk full"):
        dr.complete(items[1].prompt, gold=items[1].answer, grader="gsm8k")
    assert (dict(dr.memory.trust._states), len(dr.memory.index), dr.pacer.n, dr.store.count_experiences()) == before
    dr.close()


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """An SQLite file, or a fresh PostgreSQL database (``pg_url``: skips without one)."""
    return str(tmp_path / "s.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_two_routers_batching_the_same_rows_in_opposite_orders_lose_nothing(target):
    """Each batch touches two trust rows, one router in one order and the other in the other:
    the batch locks them in key order first (PostgreSQL), so neither waits on the other in a cycle."""
    from .test_store_pg import exp as pexp, observation
    a, b = Store(target), Store(target)
    mv = a.ensure_model_version("sensory", "sha256:aa", "x")
    assert b.ensure_model_version("sensory", "sha256:aa", "x") == mv
    rounds, errors = 15, []

    def router(store, contexts):
        try:
            for _ in range(rounds):
                store.record_many([([pexp(mv, c)], [observation(mv, 1.0, c)]) for c in contexts])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=router, args=(a, ["ctx-a", "ctx-b"])),
          threading.Thread(target=router, args=(b, ["ctx-b", "ctx-a"]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    counts = {r.context: r.count for r in a.trust_table()}
    assert counts == {"ctx-a": 2 * rounds, "ctx-b": 2 * rounds}
    assert a.verify_ledger().ok
    a.close()
    b.close()
