"""The store: migrations (fresh and from the oldest schema), re-opening, atomic record(),
resumable runs, refusing files it must not touch, model versions, queries, and throughput."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time

import pytest
from sqlalchemy import inspect

from dreamroute.errors import StoreError
from dreamroute.store import schema as T
from dreamroute.store.ledger import canonical_json, entry_hash
from dreamroute.store.migrations import MIGRATIONS, latest_version, migrate, sqlite_engine
from dreamroute.store.store import Store, TrustUpdate


def exp(**kw) -> dict:
    base = dict(role="chosen", prompt="What is 2 + 2?", tier="sensory", context="novel",
                response="The answer is 4.", prompt_tokens=9, completion_tokens=6, latency_s=0.2,
                atp_joules=3.0, outcome="success", witness="gold", novelty=1.0, salience=0.4)
    return {**base, **kw}


def update(mv: int, context: str, before: tuple[float, float], success: bool, count: int,
           index: int | None = 0) -> TrustUpdate:
    a, b = before
    return TrustUpdate(mv, context, a, b, a + success, b + (not success), count, ["gold"],
                       "success" if success else "failure", index)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sqlite_rows(path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_migrations_are_numbered_from_one():
    assert [v for v, _, _ in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert latest_version() == len(MIGRATIONS) >= 2


def test_fresh_database_matches_schema(tmp_path):
    path = tmp_path / "sub" / "dir" / "store.db"          # parent directories are created
    with Store(path) as s:
        assert s.path == path and s.applied_migrations == [v for v, _, _ in MIGRATIONS]
        insp = inspect(s._engine)
        expected = {t.name: {c.name for c in t.columns} for t in T.metadata.sorted_tables}
        got = {name: {c["name"] for c in insp.get_columns(name)} for name in insp.get_table_names()}
        assert got == expected
    indexes = {r[0] for r in sqlite_rows(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {ix.name for t in T.metadata.sorted_tables for ix in t.indexes} <= indexes
    assert sqlite_rows(path, "PRAGMA journal_mode")[0][0] == "wal"
    assert [r[:2] for r in sqlite_rows(path, "SELECT version, name FROM _migrations ORDER BY version")] \
        == [(v, n) for v, n, _ in MIGRATIONS]


def test_upgrade_from_oldest_schema_keeps_rows(tmp_path):
    path = tmp_path / "old.db"
    engine = sqlite_engine(path)
    version, name, first = MIGRATIONS[0]
    with engine.execution_options(dreamroute_write=True).begin() as conn:
        T.migrations_table.create(conn)
        first(conn)
        conn.execute(T.migrations_table.insert().values(version=version, name=name, applied_at=T.utc_now()))
    engine.dispose()
    now = T.utc_now()
    chain, prev = [], T.GENESIS_HASH           # the ledger as an older dreamroute wrote it
    for seq, (entity, action, delta, witnesses) in enumerate([
        ("model_version:1", "model.activate", {"tier": "sensory", "to": "active", "retired": None}, ["config"]),
        ("model_version:1/novel", "trust.update",
         {"alpha_before": 1.0, "beta_before": 1.0, "alpha_after": 2.0, "beta_after": 1.0, "count_after": 1,
          "trust_before": 0.5, "trust_after": 2 / 3, "reason": "success", "experience_id": 1}, ["gold"]),
    ], start=1):
        h = entry_hash(prev, seq, now, entity, action, delta, witnesses)
        chain.append((seq, now, entity, action, canonical_json(delta), canonical_json(witnesses), prev, h))
        prev = h
    row = T.experience_row(exp(model_version_id=1), "req-1", now)
    row.pop("surprise_tier")                   # added by migration 3
    row.pop("messages_hash")                   # added by migration 5
    row.pop("finish_reason")                   # added by migration 6
    row.pop("messages_hash_v1")                # added by migration 9
    row.pop("instance_id")                     # added by migration 10
    con = sqlite3.connect(path)
    with con:
        con.execute("INSERT INTO model_versions (id, tier, identity, name, status, created_at) "
                    "VALUES (1, 'sensory', 'sha256:aa', 'SmolLM2', 'active', ?)", (now,))
        con.execute("INSERT INTO trust VALUES (1, 'novel', 2.0, 1.0, 1, ?)", (now,))
        con.execute(f"INSERT INTO experiences ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    tuple(row.values()))
        con.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?)", chain)
        con.execute("INSERT INTO runs (workload, workload_digest, policy, seed, attempt, status, "
                    "started_at) VALUES ('gsm8k', 'd1', 'trust', 0, 1, 'running', ?)", (now,))
    con.close()
    assert sqlite_rows(path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'ix_experiences_tier'") == [(0,)]

    with Store(path) as s:
        assert s.applied_migrations == [v for v, _, _ in MIGRATIONS[1:]]
        assert s.count_experiences() == 1
        assert s.experiences()[0]["surprise_tier"] is None
        assert s.record_background("prefill", "sensory", 100, 2.5, 0.4, model_version_id=1) == 1
        assert s.background_atp() == 2.5
        assert s.experiences()[0]["prompt"] == "What is 2 + 2?"
        assert s.get_trust(1, "novel").alpha == 2.0
        assert s.active_versions()["sensory"].identity == "sha256:aa"
        assert s.start_run("gsm8k", "d1", "trust", 0, None, fresh=False) == 1
        report = s.verify_ledger()
        assert report.ok and report.entries == 2, report.problems
        s.record([exp(model_version_id=1)], [update(1, "novel", (2.0, 1.0), True, 2)])
        assert s.verify_ledger().ok
    assert sqlite_rows(path, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'ix_experiences_tier'") == [(1,)]


def test_reopen_is_idempotent(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        s.record([exp(model_version_id=mv)], [update(mv, "novel", (1, 1), True, 1)])
    for _ in range(2):
        with Store(path) as s:
            assert s.applied_migrations == []
            assert migrate(s._engine) == []
            assert s.ensure_model_version("sensory", "sha256:aa", "SmolLM2") == mv
            assert s.count_experiences() == 1 and len(s.trust_table()) == 1
            assert s.verify_ledger().ok
    assert sqlite_rows(path, "SELECT COUNT(*) FROM _migrations") == [(len(MIGRATIONS),)]


@pytest.mark.parametrize("where", ["fk", "nan", "append", "index"])
def test_record_is_atomic(store_db, monkeypatch, where):
    s = Store(store_db)
    mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
    s.record([exp(model_version_id=mv)], [update(mv, "novel", (1, 1), True, 1)])
    before = (s.count_experiences(), s.trust_table(), s.ledger_entries())
    exps = [exp(model_version_id=mv), exp(role="audit", tier="tactical", model_version_id=mv)]
    ups = [update(mv, "novel", (2, 1), True, 2), update(mv, "stable", (1, 1), False, 1, 1)]
    if where == "fk":                      # second update names a model version that does not exist
        ups[1].model_version_id = 999
    elif where == "nan":                   # a value the ledger cannot hash
        ups[1].alpha_after = float("nan")
    elif where == "index":                 # bad experience_index: refused before anything is written
        ups[1].experience_index = 5
    else:                                  # an arbitrary crash after the trust upsert
        def boom(*a, **k):
            raise RuntimeError("crash mid-write")
        monkeypatch.setattr("dreamroute.store.trust_rows.append_entries", boom)
    with pytest.raises((StoreError, RuntimeError)):
        s.record(exps, ups)
    monkeypatch.undo()
    assert (s.count_experiences(), s.trust_table(), s.ledger_entries()) == before
    assert s.verify_ledger().ok
    ids = s.record(exps, [update(mv, "novel", (2, 1), True, 2)])   # the store still works
    assert ids == [2, 3] if s.dialect == "sqlite" else ids[1] == ids[0] + 1   # PostgreSQL: rolled-back ids skipped
    s.close()


def test_record_writes_experiences_trust_and_ledger(store_db):
    with Store(store_db) as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        ids = s.record([exp(model_version_id=mv), exp(role="audit", model_version_id=mv, outcome="failure")],
                       [update(mv, "novel", (1, 1), True, 1, 0), update(mv, "novel", (2, 1), False, 2, 1)])
        rows = s.experiences()
        assert [r["id"] for r in rows] == ids and len({r["request_id"] for r in rows}) == 1
        assert rows[0]["prompt_hash"] == T.prompt_hash("What is  2 + 2? ") and rows[0]["created_at"].endswith("+00:00")
        t = s.get_trust(mv, "novel")
        assert (t.alpha, t.beta, t.count, t.tier, t.model) == (2.0, 2.0, 2, "sensory", "SmolLM2")
        assert t.mean == 0.5 and s.get_trust(mv, "stable") is None
        last = s.ledger_entries(1)[0]
        assert last["action"] == "trust.update" and last["entity"] == f"model_version:{mv}/novel"
        assert last["delta"]["experience_id"] == ids[1] and last["delta"]["trust_after"] == 0.5
        assert last["witnesses"] == ["gold"]
        with pytest.raises(StoreError, match="unknown experience fields"):
            s.record([exp(colour="red")], [])
        with pytest.raises(StoreError, match="required"):
            s.record([{"prompt": "x"}], [])


@pytest.mark.parametrize("where", ["memory", "file or server"])
def test_feedback_outcome_updates_trust_in_one_transaction(store_db, where):
    with Store(None if where == "memory" else store_db) as s:
        assert (s.path is None) == (where == "memory" or s.dialect == "postgresql")
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        ids = s.record([exp(model_version_id=mv, outcome="unknown", witness="", request_id="r-1"),
                        exp(role="audit", model_version_id=mv, request_id="r-1")], [])
        assert [r["id"] for r in s.experiences_for_request("r-1")] == ids
        assert s.experiences_for_request("nope") == []
        upd = TrustUpdate(mv, "novel", 1.0, 1.0, 1.0, 2.0, 1, ["user"], "feedback failure")
        s.record_outcome(ids[0], "failure", "user", upd)
        assert s.experiences_for_request("r-1")[0]["outcome"] == "failure"
        assert s.get_trust(mv, "novel").beta == 2.0
        assert s.ledger_entries(1)[0]["delta"]["experience_id"] == ids[0]
        with pytest.raises(StoreError):        # unknown experience: the trust update is not kept
            s.record_outcome(999, "success", "user", TrustUpdate(mv, "novel", 1.0, 2.0, 2.0, 2.0, 2))
        assert s.get_trust(mv, "novel").count == 1 and s.verify_ledger().ok


def test_resume_runs(store_db):
    path = store_db
    with Store(path) as s:
        r1 = s.start_run("gsm8k/test.jsonl", "d1", "trust", 0, 2.5, fresh=False)
        assert s.start_run("gsm8k/test.jsonl", "d1", "trust", 0, 2.5, fresh=False) == r1
        s.record([exp(run_id=r1, item_key="q1"), exp(run_id=r1, item_key="q1", role="escalated")], [])
        s.record([exp(run_id=r1, item_key="q2")], [])
        s.record([exp(run_id=r1, item_key="q3", role="audit")], [])
        assert s.graded_items(r1) == {"q1", "q2"}
    with Store(path) as s:                                           # resumed by another process
        assert s.start_run("gsm8k/test.jsonl", "d1", "trust", 0, 2.5, fresh=False) == r1
        assert s.graded_items(r1) == {"q1", "q2"}
        r2 = s.start_run("gsm8k/test.jsonl", "d1", "trust", 0, 2.5, fresh=True)
        assert r2 != r1 and s.graded_items(r2) == set()
        assert s.run_info(r2)["attempt"] == 2 and s.run_info(r1)["experiences"] == 4
        assert s.start_run("gsm8k/test.jsonl", "d1", "trust", 0, 2.5, fresh=False) == r2
        assert s.start_run("gsm8k/test.jsonl", "d1", "trust", 1, 2.5, fresh=False) not in (r1, r2)
        assert s.start_run("gsm8k/test.jsonl", "d1", "cheapest", 0, None, fresh=False) not in (r1, r2)
        s.finish_run(r1)
        info = s.run_info(r1)
        assert info["status"] == "finished" and info["graded"] == 2 and info["budget"] == 2.5
        assert s.run_info(r2)["status"] == "running"
        with pytest.raises(StoreError):
            s.run_info(999)


def _unusable_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n" * 20)
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(os.urandom(8192))
    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    newer = tmp_path / "newer.db"
    Store(newer).close()
    con = sqlite3.connect(newer)
    con.execute("INSERT INTO _migrations VALUES (?, 'from the future', '2999-01-01T00:00:00+00:00')",
                (latest_version() + 1,))
    con.commit()
    con.close()
    return {"text": (text, "not an SQLite file"), "random": (rnd, "not an SQLite file"),
            "foreign": (foreign, "not a dreamroute one"), "newer": (newer, "newer than this dreamroute")}


@pytest.mark.parametrize("kind", ["text", "random", "foreign", "newer"])
def test_unusable_file_is_refused_and_untouched(tmp_path, kind):
    path, why = _unusable_files(tmp_path)[kind]
    before = digest(path)
    with pytest.raises(StoreError) as err:
        Store(path)
    msg = str(err.value)
    assert str(path) in msg and why in msg and "--db" in msg
    assert digest(path) == before


def test_newer_schema_refused_by_migrate_too(tmp_path):
    path, _ = _unusable_files(tmp_path)["newer"]
    engine = sqlite_engine(path)
    with pytest.raises(StoreError, match="newer"):
        migrate(engine)
    engine.dispose()


def test_directory_and_truncated_file_are_refused(tmp_path):
    with pytest.raises(StoreError, match="directory"):
        Store(tmp_path)
    good = tmp_path / "good.db"
    Store(good).close()
    broken = tmp_path / "broken.db"
    broken.write_bytes(good.read_bytes()[:100] + b"\x00" * 50)
    before = digest(broken)
    with pytest.raises(StoreError, match="choose another --db"):
        Store(broken)
    assert digest(broken) == before


def test_model_versions(store_db):
    with Store(store_db) as s:
        a = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        assert s.ensure_model_version("sensory", "sha256:aa", "SmolLM2") == a
        b = s.ensure_model_version("sensory", "sha256:bb", "SmolLM2 v2")
        assert b != a and s.get_version(a).status == "retired"
        assert s.ensure_model_version("sensory", "sha256:aa", "SmolLM2") == a     # reactivated
        assert s.get_version(b).status == "retired"
        t = s.ensure_model_version("tactical", "sha256:cc", "Qwen 0.5B")
        assert {k: v.id for k, v in s.active_versions().items()} == {"sensory": a, "tactical": t}
        cand = s.add_version("sensory", "sha256:aa", "SmolLM2+lora", adapter_path="/a/lora.gguf",
                             parent_id=a, witnesses=["dream"], reason="distilled")
        assert s.get_version(cand).status == "candidate" and s.get_version(cand).parent_id == a
        s.set_version_status(cand, "active", witnesses=["validation"], reason="held-out +4%")
        assert s.active_versions()["sensory"].id == cand and s.get_version(a).status == "retired"
        assert s.ensure_model_version("sensory", "sha256:aa", "SmolLM2") == cand    # same identity
        with pytest.raises(StoreError):
            s.add_version("sensory", "sha256:aa", "dup", adapter_path="/a/lora.gguf", parent_id=a)
        with pytest.raises(StoreError):
            s.get_version(999)
        with pytest.raises(StoreError):
            s.set_version_status(cand, "promoted")
        actions = [e["action"] for e in s.ledger_entries()]
        assert actions.count("model.activate") == 5 and "model.candidate" in actions
        assert s.verify_ledger().ok


def test_queries_outcomes_and_calibration(store_db):
    with Store(store_db) as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        for i in range(5):
            s.record([exp(model_version_id=mv, tier="sensory" if i % 2 else "tactical", turn=i)], [])
        assert s.count_experiences() == 5
        assert [r["turn"] for r in s.experiences(["turn"], tier="sensory")] == [1, 3]
        assert [r["id"] for r in s.experiences(["id"], since_id=3)] == [4, 5]
        assert set(s.experiences(["id", "outcome"])[0]) == {"id", "outcome"}
        with pytest.raises(StoreError, match="unknown experience columns"):
            s.experiences(["nope"])
        s.set_outcome(2, "failure", "user")
        assert s.experiences(["outcome", "witness"], since_id=1)[0] == {"outcome": "failure", "witness": "user"}
        with pytest.raises(StoreError):
            s.set_outcome(2, "great", "user")
        with pytest.raises(StoreError):
            s.set_outcome(99, "success", "user")
        assert s.get_calibration("sha256:aa") is None
        vals = {"prefill_s_per_token": 0.0004, "decode_s_per_token": 0.011, "load_s": 0.3,
                "ttft_s": 0.05, "prefill_tok_s": 2500.0, "decode_tok_s": 90.0, "rss_mb": 210.5}
        s.save_calibration("sha256:aa", "sensory", vals)
        s.save_calibration("sha256:aa", "sensory", {**vals, "decode_tok_s": 91.0})
        got = s.get_calibration("sha256:aa")
        assert got["decode_tok_s"] == 91.0 and got["tier"] == "sensory" and got["identity"] == "sha256:aa"
        assert s.ledger_entries(1)[0]["action"] == "calibration"
        seq = s.append_ledger("dream", "dream.cycle", {"examples": 12}, ["dream"])
        assert s.ledger_entries(1)[0]["seq"] == seq and s.verify_ledger().ok


def test_concurrent_writers_keep_their_chains(store_db):
    path = store_db
    stores = [Store(path), Store(path)]             # two routers sharing one file (or server)
    mv = stores[0].ensure_model_version("sensory", "sha256:aa", "SmolLM2")

    def work(s: Store, ctx: str):
        a = 1.0
        for n in range(1, 41):
            s.record([exp(model_version_id=mv, context=ctx)], [update(mv, ctx, (a, 1.0), True, n)])
            a += 1

    threads = [threading.Thread(target=work, args=(stores[i % 2], c))
               for i, c in enumerate(["stable", "moving", "novel", "unstable"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = stores[1].verify_ledger()
    assert report.ok, report.problems
    assert report.entries == 1 + 160 and stores[0].count_experiences() == 160
    assert report.chains == {stores[0].instance_id: 1 + 80, stores[1].instance_id: 80}   # one chain per router
    for s in stores:
        s.close()


def test_many_records_are_all_stored_and_ledgered(tmp_path):
    """400 record() calls in a row: every experience, trust update and ledger entry is there.
    (Its speed is a benchmark, not a test: benchmarks/store_throughput.py.)"""
    with Store(tmp_path / "s.db") as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        n, a = 400, 1.0
        for i in range(n):
            s.record([exp(model_version_id=mv, item_key=f"q{i}"), exp(role="audit", model_version_id=mv)],
                     [update(mv, "novel", (a, 1.0), True, i + 1, 0)])
            a += 1
        rows = s.experiences(["id", "tier", "context", "outcome", "atp_joules"])
        assert len(rows) == 2 * n
        report = s.verify_ledger()
        assert report.ok, report.problems
