"""The store on PostgreSQL and shared by several routers: ``--db`` URLs (never a file), the same
migrations from empty and from the oldest schema, two processes migrating at once, trust updates
atomic under concurrent writers, one ledger chain per instance (each verified, trust checked
against all), tampering in one chain detected.

The PostgreSQL cases use the ``pg_url`` fixture (a fresh database per test on the server of
``$DREAMROUTE_TEST_PG_URL``: ``eval "$(bash scripts/pg_test_cluster.sh start)"``); they skip
without it locally and fail without it in CI. Cases marked ``db`` run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import threading

import pytest
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from dreamroute.cli import app
from dreamroute.config import Settings
from dreamroute.errors import StoreError
from dreamroute.store import schema as T
from dreamroute.store.ledger import canonical_json, entry_hash
from dreamroute.store.migrations import MIGRATIONS
from dreamroute.store.store import Store, TrustUpdate

N_WRITERS, N_UPDATES = 4, 25


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """A fresh store target: an SQLite file path, or a PostgreSQL URL (``pg_url``)."""
    if request.param == "sqlite":
        return str(tmp_path / "s.db")
    return request.getfixturevalue("pg_url")


def exp(mv: int, context: str = "novel", **kw) -> dict:
    return {"role": "chosen", "prompt": "What is 2 + 2?", "tier": "sensory", "context": context,
            "model_version_id": mv, "outcome": "success", "witness": "gold", **kw}


def observation(mv: int, reward: float, context: str = "novel", gamma: float = 1.0) -> TrustUpdate:
    """An observation the store applies to the row as it finds it (the caller's before/after: a guess)."""
    return TrustUpdate(mv, context, 1.0, 1.0, 1.0 + reward, 2.0 - reward, 1, ["gold"], "graded", 0,
                       reward=reward, op="observe", gamma=gamma)


def sql(url: str, statement: str, **params) -> list:
    engine = create_engine(url.replace("postgresql+psycopg", "postgresql+psycopg", 1) if "://" in url
                           else f"sqlite:///{url}")
    try:
        with engine.begin() as conn:
            res = conn.execute(text(statement), params)
            return res.all() if res.returns_rows else []
    finally:
        engine.dispose()


# ---- URLs are never file names ----------------------------------------------------------------
def test_a_url_is_never_a_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "postgresql+psycopg://user:s3cret@127.0.0.1:1/dreamroute"   # nothing listens on port 1
    s = Settings(db=url, data_dir=tmp_path)
    assert s.db_path == url and isinstance(s.db_path, str) and s.sync_enabled
    assert s.db_display == "postgresql+psycopg://user:***@127.0.0.1:1/dreamroute"
    assert Settings(db=str(tmp_path / "x.db")).db_path == tmp_path / "x.db" and not Settings().sync_enabled
    with pytest.raises(StoreError) as e:
        Store(url)
    msg = str(e.value)
    assert "user:***@127.0.0.1:1/dreamroute" in msg and "s3cret" not in msg
    assert "PostgreSQL server running" in msg and "pg_test_cluster.sh" in msg
    r = CliRunner().invoke(app, ["trust", "--db", url])
    assert r.exit_code == 2 and "StoreError" in r.output and "s3cret" not in r.output
    assert list(tmp_path.iterdir()) == []          # no folder "postgresql+psycopg:", no file


def test_a_missing_driver_or_another_server_is_named_with_the_fix(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)     # as if the extra were not installed
    with pytest.raises(StoreError, match=r"driver .* not installed.*dreamroute\[postgres\]") as e:
        Store("postgresql://me:pw@127.0.0.1:5432/db")                   # postgresql:// means psycopg 3
    assert "pw@" not in str(e.value)
    with pytest.raises(StoreError, match="only SQLite .* and PostgreSQL"):
        Store("mysql+pymysql://me:pw@127.0.0.1/db")


# ---- migrations on PostgreSQL ------------------------------------------------------------------
def test_postgres_from_empty_matches_the_schema(pg_url):
    with Store(pg_url) as s:
        assert s.dialect == "postgresql" and s.path is None and s.anchor is None
        assert s.applied_migrations == [v for v, _, _ in MIGRATIONS]
        insp = inspect(s._engine)
        expected = {t.name: {c.name for c in t.columns} for t in T.metadata.sorted_tables}
        got = {name: {c["name"] for c in insp.get_columns(name)} for name in insp.get_table_names()}
        assert got == expected
        indexes = {ix["name"] for t in insp.get_table_names() for ix in insp.get_indexes(t)}
        assert {ix.name for t in T.metadata.sorted_tables for ix in t.indexes} <= indexes
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        assert s.record_background("prefill", "sensory", 10, 1.5, 0.1, model_version_id=mv) == 1   # SERIAL ids
        cyc = s.start_cycle("tactical", "specialized", mv, "/tmp/w", {"a": 1})
        assert s.cycles()[0]["id"] == cyc
        s.save_calibration("sha256:aa", "sensory", {"decode_s_per_token": 0.01})
        assert s.get_calibration("sha256:aa")["decode_s_per_token"] == 0.01
        run = s.start_run("w", "d", "p", 0, None, fresh=False)
        ids = s.record([exp(mv, run_id=run, item_key="q1")], [observation(mv, 1.0)])
        assert s.graded_items(run) == {"q1"} and s.run_info(run)["experiences"] == 1
        s.record_outcome(ids[0], "failure", "user",
                         TrustUpdate(mv, "novel", 2, 1, 1, 2, 1, ["user"], "feedback", None, reward=0.0,
                                     op="replace", replaces={"reward": 1.0, "slot_count": 1.0}))
        t = s.get_trust(mv, "novel")
        assert (t.alpha, t.beta, t.count) == (1.0, 2.0, 1.0)
        assert s.verify_ledger().ok
    with Store(pg_url) as s:                        # reopening applies nothing
        assert s.applied_migrations == [] and s.verify_ledger().ok


def test_postgres_upgrade_from_oldest_schema_keeps_rows_and_the_legacy_chain(pg_url):
    engine = create_engine(pg_url)
    version, name, first = MIGRATIONS[0]
    now = T.utc_now()
    chain, prev = [], T.GENESIS_HASH                # the ledger as an older dreamroute wrote it
    for seq, (entity, action, delta, witnesses) in enumerate([
        ("model_version:1", "model.activate", {"tier": "sensory", "to": "active", "retired": None}, ["config"]),
        ("model_version:1/novel", "trust.update",
         {"alpha_before": 1.0, "beta_before": 1.0, "alpha_after": 2.0, "beta_after": 1.0, "count_after": 1,
          "trust_before": 0.5, "trust_after": 2 / 3, "reason": "success", "experience_id": 1}, ["gold"]),
    ], start=1):
        h = entry_hash(prev, seq, now, entity, action, delta, witnesses)
        chain.append(dict(seq=seq, created_at=now, entity=entity, action=action, delta=canonical_json(delta),
                          witnesses=canonical_json(witnesses), prev_hash=prev, hash=h))
        prev = h
    row = T.experience_row(exp(1), "req-1", now)
    for late in ("surprise_tier", "messages_hash", "finish_reason", "messages_hash_v1", "instance_id"):
        row.pop(late)                                # added by later migrations
    with engine.begin() as conn:
        T.migrations_table.create(conn)
        first(conn)
        conn.execute(T.migrations_table.insert().values(version=version, name=name, applied_at=now))
        conn.execute(text("INSERT INTO model_versions (tier, identity, name, status, created_at) "
                          "VALUES ('sensory', 'sha256:aa', 'SmolLM2', 'active', :now)"), {"now": now})
        conn.execute(text("INSERT INTO trust VALUES (1, 'novel', 2.0, 1.0, 1, :now)"), {"now": now})
        conn.execute(text(f"INSERT INTO experiences ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"),
                     row)
        conn.execute(text("INSERT INTO ledger (seq, created_at, entity, action, delta, witnesses, prev_hash, hash) "
                          "VALUES (:seq, :created_at, :entity, :action, :delta, :witnesses, :prev_hash, :hash)"),
                     chain)
    engine.dispose()
    with Store(pg_url) as s:
        assert s.applied_migrations == [v for v, _, _ in MIGRATIONS[1:]]
        assert s.count_experiences() == 1 and s.experiences()[0]["instance_id"] is None
        report = s.verify_ledger()
        assert report.ok and report.chains == {"legacy": 2}, report.problems
        assert s.record_background("prefill", "sensory", 100, 2.5, 0.4, model_version_id=1) == 1
        ids = s.record([exp(1)], [observation(1, 1.0)])
        assert ids == [2]                            # the SERIAL sequence went on from the old rows
        t = s.get_trust(1, "novel")
        assert (t.alpha, t.beta, t.count) == (3.0, 1.0, 2.0)
        last = s.ledger_entries(1)[0]
        assert last["seq"] == 3 and last["instance_id"] == s.instance_id and last["chain_seq"] == 1
        assert last["delta"]["alpha_before"] == 2.0   # the row's true value, not the caller's guess
        report = s.verify_ledger()
        assert report.ok and report.chains == {"legacy": 2, s.instance_id: 1}, report.problems


def _open_at_once(target: str, barrier, out) -> None:
    barrier.wait(60)
    try:
        with Store(target) as s:
            out.put(("ok", s.applied_migrations))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put(("error", repr(e)))


def test_two_processes_migrating_one_fresh_database_at_once(db):
    ctx = mp.get_context("fork")   # the modules are loaded already (spawn: ~10 s a child here)
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(db, barrier, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(kind == "ok" for kind, _ in results), results
    applied = sorted(v for _, vs in results for v in vs)
    assert applied == [v for v, _, _ in MIGRATIONS]           # each migration applied exactly once
    with Store(db) as s:
        assert s.applied_migrations == [] and s.verify_ledger().ok


# ---- trust atomic under concurrent writers -----------------------------------------------------
def _write_trust(target: str, mv: int, rewards: list[float], barrier, out) -> None:
    barrier.wait(60)
    try:
        with Store(target) as s:                    # its own instance: its own ledger chain
            for r in rewards:
                s.record([exp(mv, outcome="success" if r >= 0.5 else "failure")], [observation(mv, r)])
            out.put(("ok", s.instance_id))
    except Exception as e:  # noqa: BLE001
        out.put(("error", repr(e)))


def test_concurrent_writers_lose_no_trust_update(db):
    with Store(db) as s:
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
    rng = random.Random(7)
    rewards = [[rng.choice([0.0, 1.0, 0.25]) for _ in range(N_UPDATES)] for _ in range(N_WRITERS)]
    ctx = mp.get_context("fork")   # the modules are loaded already (spawn: ~10 s a child here)
    barrier, out = ctx.Barrier(N_WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_write_trust, args=(db, mv, rs, barrier, out)) for rs in rewards]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(kind == "ok" for kind, _ in results), results
    flat = [r for rs in rewards for r in rs]
    with Store(db) as s:                            # forgetting off: the order does not matter
        t = s.get_trust(mv, "novel")
        assert t.count == len(flat) == N_WRITERS * N_UPDATES
        assert t.alpha == pytest.approx(1 + sum(flat), abs=1e-9)
        assert t.beta == pytest.approx(1 + sum(1 - r for r in flat), abs=1e-9)
        report = s.verify_ledger()
        assert report.ok, report.problems
        for _, iid in results:
            assert report.chains[iid] == N_UPDATES   # each writer's chain holds its own updates


def test_threads_of_one_router_and_a_second_router_interleave_without_loss(db):
    """Two stores (two routers) on one database, two threads each, forgetting on: every entry
    starts where the previous one (any chain) ended, so the row is the sequential result."""
    a, b = Store(db), Store(db)
    mv = a.ensure_model_version("sensory", "sha256:aa", "SmolLM2")

    def work(s: Store):
        for _ in range(15):
            s.record([exp(mv)], [observation(mv, 1.0, gamma=0.9)])

    threads = [threading.Thread(target=work, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alpha = 1.0
    for _ in range(60):
        alpha = 1 + 0.9 * (alpha - 1) + 1
    row = a.get_trust(mv, "novel")
    assert row.count == 60 and row.alpha == pytest.approx(alpha, rel=1e-12) and row.beta == 1.0
    report = b.verify_ledger()
    assert report.ok and report.chains[a.instance_id] == 1 + 30 and report.chains[b.instance_id] == 30, report
    a.close()
    b.close()


# ---- one chain per instance: tampering in one is found -----------------------------------------
def _two_chains(db: str) -> tuple[str, str, int]:
    with Store(db, instance_id="router-a") as a, Store(db, instance_id="router-b") as b:
        mv = a.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        for i in range(6):
            (a if i % 2 else b).record([exp(mv)], [observation(mv, float(i % 3 == 0))])
        assert a.verify_ledger().ok
    return "router-a", "router-b", mv


def test_an_edited_entry_in_one_chain_is_named(db):
    _, chain_b, _ = _two_chains(db)
    seq, delta = sql(db, "SELECT seq, delta FROM ledger WHERE instance_id = :c AND chain_seq = 2", c=chain_b)[0]
    d = json.loads(delta)
    d["reason"] = "rewritten history"
    sql(db, "UPDATE ledger SET delta = :d WHERE seq = :s", d=canonical_json(d), s=seq)
    with Store(db) as s:
        report = s.verify_ledger()
    assert not report.ok and len(report.problems) == 1, report.problems
    assert f"seq {seq} (chain {chain_b} #2): hash mismatch" in report.problems[0]
    r = CliRunner().invoke(app, ["ledger", "verify", "--db", db])
    assert r.exit_code == 1 and "hash mismatch" in r.output


def test_a_rehashed_entry_that_breaks_the_trust_history_across_chains_is_found(db):
    """An entry rewritten with a valid hash (its chain intact) whose before no longer follows the
    entry before it in the row's history (another chain): the cross-chain link check names both."""
    _, chain_b, mv = _two_chains(db)
    rows = sql(db, "SELECT seq, chain_seq, prev_hash, created_at, entity, action, delta, witnesses FROM ledger "
                   "WHERE instance_id = :c ORDER BY chain_seq", c=chain_b)
    last = rows[-1]                                 # the chain's last entry: rehashing it breaks no link
    d = json.loads(last[6])
    d["alpha_before"] += 1.0
    h = entry_hash(last[2], last[1], last[3], last[4], last[5], d, json.loads(last[7]), chain_b)
    sql(db, "UPDATE ledger SET delta = :d, hash = :h WHERE seq = :s", d=canonical_json(d), h=h, s=last[0])
    with Store(db) as s:
        report = s.verify_ledger()
    links = [p for p in report.problems if "lost update" in p]
    assert len(links) == 1 and f"model_version {mv} / novel" in links[0] and f"seq {last[0]} (chain {chain_b})" in links[0]
    others = [p for p in report.problems if p not in links]   # SQLite: the anchored head changed too
    assert others == [] if db.startswith("postgresql") else len(others) == 1 and "differs from the head" in others[0]


def test_a_removed_middle_entry_of_one_chain_is_found(db):
    chain_a, _, _ = _two_chains(db)
    sql(db, "DELETE FROM ledger WHERE instance_id = :c AND chain_seq = 2", c=chain_a)
    with Store(db) as s:
        problems = s.verify_ledger().problems
    assert any(f"chain {chain_a}: entries 2..2 are missing" in p for p in problems), problems


def test_sqlite_anchors_every_chain(tmp_path):
    from dreamroute.store.anchor import anchor_path, read_anchor, read_anchors
    db = str(tmp_path / "s.db")
    chain_a, chain_b, _ = _two_chains(db)
    anchors = read_anchors(anchor_path(tmp_path / "s.db"))
    assert set(anchors) == {chain_a, chain_b} and anchors[chain_a].seq == 1 + 3 and anchors[chain_b].seq == 3
    assert read_anchor(anchor_path(tmp_path / "s.db")) is None      # several: name the chain
    sql(db, "DELETE FROM ledger WHERE instance_id = :c AND chain_seq = 3", c=chain_b)   # b's tail
    sql(db, "UPDATE trust SET alpha = alpha")       # (the rows are not even rolled back: two findings)
    with Store(db) as s:
        problems = s.verify_ledger().problems
    assert any(f"chain {chain_b}: the ledger ends at seq 2" in p and "3..3 were removed" in p for p in problems)


def test_configured_instance_id_is_validated(tmp_path):
    with pytest.raises(StoreError, match="legacy"):
        Store(tmp_path / "s.db", instance_id="legacy")
    with pytest.raises(Exception, match="instance_id"):
        Settings(store={"instance_id": "legacy"})
    assert Settings(store={"instance_id": "edge-1"}).store.instance_id == "edge-1"
    assert os.environ.get("DREAMROUTE_STORE__INSTANCE_ID") is None
