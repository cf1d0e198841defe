"""Numbered schema migrations, applied in order, each once (in the style of simonw/llm).

Each migration is explicit DDL frozen at the time it was written: never edit
one that has shipped, add the next number instead. ``schema.py`` describes
the result of all of them. Migration 1 creates the tables; migration 2 adds
the lookup indexes and the model-version uniqueness index; migration 3 adds
``experiences.surprise_tier`` (which tier's log-likelihood the surprise is)
and the ``background_work`` table (idle-time prefills and their ATP);
migration 4 adds ``dream_cycles`` (each consolidation cycle's stage and results);
migration 5 adds ``experiences.messages_hash`` (the key of the whole message
list, what the server's fast path looks answers up by) and its index;
migration 6 adds ``experiences.finish_reason`` (``stop`` or ``length``: the fast
path never serves an answer that was cut off); migration 7 adds
``background_work.status``, ``.detail`` and ``.request_id`` (a failed call's upstream
status, the backend's message, its request); migration 8 adds ``verdicts`` (the one
verdict each response holds in trust, so a changed verdict replaces it); migration 9
moves the stored fast-path keys, computed with whitespace collapsed, to
``experiences.messages_hash_v1`` (kept, never looked up): the fast path now keys the
exact message list, and an old key could match another conversation; migration 10
adds ``ledger.instance_id`` and ``ledger.chain_seq`` (one hash chain per router instance;
the entries before it form the chain ``legacy``, ``chain_seq = seq``), their unique index,
and ``experiences.instance_id`` (which router stored it; NULL before 10); on PostgreSQL also
the sequence ``ledger_seq_global`` that numbers entries across chains.

The same migrations run on PostgreSQL (``postgresql+psycopg://``), where DDL is
transactional too. Where SQLite and PostgreSQL DDL differ the migration branches on
``conn.dialect.name`` (an autoincrementing ``INTEGER PRIMARY KEY`` is ``SERIAL`` there);
the SQLite text of a shipped migration is never changed. Two processes migrating one
database at once is safe: on SQLite each migration's transaction is ``BEGIN IMMEDIATE``
(the second waits, then finds the migration applied and skips it); on PostgreSQL each takes
``pg_advisory_xact_lock(MIGRATION_LOCK)`` first, with the same effect.

``migrate(engine)`` records each applied migration in
``_migrations(version, name, applied_at)``; every migration runs in its own
transaction together with that record, so an interrupted upgrade leaves the
database at the previous version (SQLite DDL is transactional when the
connection emits its own BEGIN, as ``sqlite_engine`` arranges).

Opening a SQLite file goes through ``check_sqlite_file`` first (read-only:
refuses a non-SQLite file, a foreign SQLite database, or a newer schema
without touching it) and then ``sqlite_engine`` (WAL, busy_timeout, foreign
keys, explicit BEGIN / BEGIN IMMEDIATE, ``synchronous = FULL``).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL, CheckConstraint, Column, Engine, Float, ForeignKey, Integer, MetaData, String, Table, Text,
    UniqueConstraint, create_engine, event, insert, inspect, select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from dreamroute.errors import StoreError
from dreamroute.store.schema import migrations_table, utc_now

_SQLITE_MAGIC = b"SQLite format 3\x00"
Migration = tuple[int, str, Callable[[Connection], None]]


def _m001_initial(conn: Connection) -> None:
    """Create model_versions, trust, runs, experiences, ledger and calibration (no secondary indexes)."""
    md = MetaData()
    s, f, i, t = String, Float, Integer, Text
    Table("model_versions", md,
          Column("id", i, primary_key=True), Column("tier", s(100), nullable=False),
          Column("identity", s(300), nullable=False), Column("name", s(300), nullable=False),
          Column("adapter_path", t), Column("parent_id", i, ForeignKey("model_versions.id")),
          Column("status", s(20), nullable=False), Column("created_at", s(40), nullable=False),
          CheckConstraint("status IN ('active','candidate','rejected','retired')",
                          name="ck_model_versions_status"))
    Table("trust", md,
          Column("model_version_id", i, ForeignKey("model_versions.id"), primary_key=True),
          Column("context", s(40), primary_key=True), Column("alpha", f, nullable=False),
          Column("beta", f, nullable=False), Column("count", f, nullable=False),
          Column("updated_at", s(40), nullable=False))
    Table("runs", md,
          Column("id", i, primary_key=True), Column("workload", t, nullable=False),
          Column("workload_digest", s(128), nullable=False), Column("policy", s(300), nullable=False),
          Column("seed", i, nullable=False), Column("budget", f), Column("attempt", i, nullable=False),
          Column("status", s(20), nullable=False), Column("started_at", s(40), nullable=False),
          Column("finished_at", s(40)),
          UniqueConstraint("workload_digest", "policy", "seed", "attempt", name="uq_runs_key"),
          CheckConstraint("status IN ('running','finished')", name="ck_runs_status"))
    required_f = ["prefill_s", "decode_s", "latency_s", "atp_joules", "novelty", "drift",
                  "snarc_s", "snarc_n", "snarc_a", "snarc_r", "snarc_c", "salience"]
    Table("experiences", md,
          Column("id", i, primary_key=True), Column("request_id", s(64), nullable=False),
          Column("run_id", i, ForeignKey("runs.id")), Column("item_key", s(300)),
          Column("role", s(20), nullable=False), Column("conversation_id", s(200)),
          Column("turn", i, nullable=False), Column("prompt", t, nullable=False),
          Column("prompt_hash", s(64), nullable=False), Column("tier", s(100), nullable=False),
          Column("model_version_id", i, ForeignKey("model_versions.id")),
          Column("response", t, nullable=False), Column("prompt_tokens", i, nullable=False),
          Column("completion_tokens", i, nullable=False), Column("cached_tokens", i, nullable=False),
          *[Column(n, f, nullable=False) for n in required_f[:4]],
          Column("mean_logprob", f), Column("confidence", f), Column("context", s(40), nullable=False),
          *[Column(n, f, nullable=False) for n in required_f[4:6]],
          Column("instability", f), Column("surprise", f),
          *[Column(n, f, nullable=False) for n in required_f[6:]],
          Column("outcome", s(20), nullable=False), Column("witness", s(200), nullable=False),
          Column("gold", t), Column("predicted", t), Column("priority", f, nullable=False),
          Column("created_at", s(40), nullable=False),
          CheckConstraint("role IN ('chosen','escalated','audit')", name="ck_experiences_role"),
          CheckConstraint("outcome IN ('success','failure','unknown')", name="ck_experiences_outcome"))
    Table("ledger", md,
          Column("seq", i, primary_key=True, autoincrement=False),
          Column("created_at", s(40), nullable=False), Column("entity", s(300), nullable=False),
          Column("action", s(100), nullable=False), Column("delta", t, nullable=False),
          Column("witnesses", t, nullable=False), Column("prev_hash", s(64), nullable=False),
          Column("hash", s(64), nullable=False))
    Table("calibration", md,
          Column("identity", s(300), primary_key=True), Column("tier", s(100), nullable=False),
          Column("values", t, nullable=False), Column("updated_at", s(40), nullable=False))
    md.create_all(conn)


def _m002_indexes(conn: Connection) -> None:
    """Lookup indexes, and one row per (tier, identity, adapter) in model_versions."""
    for ddl in (
        "CREATE UNIQUE INDEX ux_model_versions_key ON model_versions "
        "(tier, identity, COALESCE(adapter_path, ''))",
        "CREATE INDEX ix_model_versions_tier_status ON model_versions (tier, status)",
        "CREATE INDEX ix_experiences_run_item ON experiences (run_id, item_key)",
        "CREATE INDEX ix_experiences_tier ON experiences (tier)",
        "CREATE INDEX ix_experiences_prompt_hash ON experiences (prompt_hash)",
        "CREATE INDEX ix_experiences_request ON experiences (request_id)",
        "CREATE INDEX ix_experiences_conversation ON experiences (conversation_id, turn)",
        "CREATE INDEX ix_ledger_entity ON ledger (entity, seq)",
    ):
        conn.exec_driver_sql(ddl)


def _serial_pk(conn: Connection) -> str:
    """An autoincrementing integer primary key column's DDL: SQLite's rowid alias, PostgreSQL's SERIAL."""
    return "id SERIAL PRIMARY KEY" if conn.dialect.name == "postgresql" else "id INTEGER NOT NULL PRIMARY KEY"


def _m003_kv_cache(conn: Connection) -> None:
    """experiences.surprise_tier, and background_work (warm-handoff prefills, their tokens and ATP)."""
    conn.exec_driver_sql("ALTER TABLE experiences ADD COLUMN surprise_tier VARCHAR(100)")
    conn.exec_driver_sql(
        "CREATE TABLE background_work ("
        f"{_serial_pk(conn)}, kind VARCHAR(40) NOT NULL, tier VARCHAR(100) NOT NULL, "
        "model_version_id INTEGER REFERENCES model_versions (id), conversation_id VARCHAR(200), "
        "tokens INTEGER NOT NULL, atp_joules FLOAT NOT NULL, seconds FLOAT NOT NULL, "
        "run_id INTEGER REFERENCES runs (id), created_at VARCHAR(40) NOT NULL)")


def _m004_dream_cycles(conn: Connection) -> None:
    """dream_cycles: one row per consolidation cycle, its stage, work directory and results."""
    conn.exec_driver_sql(
        "CREATE TABLE dream_cycles ("
        f"{_serial_pk(conn)}, student VARCHAR(100) NOT NULL, teacher VARCHAR(100) NOT NULL, "
        "base_version_id INTEGER NOT NULL REFERENCES model_versions (id), "
        "version_id INTEGER REFERENCES model_versions (id), status VARCHAR(20) NOT NULL, "
        "stage VARCHAR(40) NOT NULL, workdir TEXT NOT NULL, config TEXT NOT NULL, result TEXT NOT NULL, "
        "created_at VARCHAR(40) NOT NULL, updated_at VARCHAR(40) NOT NULL, "
        "CONSTRAINT ck_dream_cycles_status CHECK (status IN ('running','promoted','rejected','failed')))")


def _m005_messages_hash(conn: Connection) -> None:
    """experiences.messages_hash: the normalised whole-conversation key of the fast path."""
    conn.exec_driver_sql("ALTER TABLE experiences ADD COLUMN messages_hash VARCHAR(64)")
    conn.exec_driver_sql("CREATE INDEX ix_experiences_messages_hash ON experiences (messages_hash)")


def _m006_finish_reason(conn: Connection) -> None:
    """experiences.finish_reason: why generation stopped (``stop``, ``length``; NULL before 6)."""
    conn.exec_driver_sql("ALTER TABLE experiences ADD COLUMN finish_reason VARCHAR(20)")


def _m007_failed_call_detail(conn: Connection) -> None:
    """background_work.status, .detail and .request_id: a failed call's upstream HTTP status,
    the backend's message, and the request it was made for (NULL before 7 and for other kinds)."""
    conn.exec_driver_sql("ALTER TABLE background_work ADD COLUMN status INTEGER")
    conn.exec_driver_sql("ALTER TABLE background_work ADD COLUMN detail TEXT")
    conn.exec_driver_sql("ALTER TABLE background_work ADD COLUMN request_id VARCHAR(64)")


def _m008_verdicts(conn: Connection) -> None:
    """verdicts: per experience, the reward it holds in trust now and where its observation sits
    (the trust row's count right after it), so that a changed verdict replaces it."""
    conn.exec_driver_sql(
        "CREATE TABLE verdicts ("
        "experience_id INTEGER NOT NULL PRIMARY KEY REFERENCES experiences (id), "
        "model_version_id INTEGER NOT NULL REFERENCES model_versions (id), context VARCHAR(40) NOT NULL, "
        "reward FLOAT NOT NULL, slot_count FLOAT NOT NULL, outcome VARCHAR(20) NOT NULL, "
        "witness VARCHAR(200) NOT NULL, ledger_seq INTEGER NOT NULL, updated_at VARCHAR(40) NOT NULL)")


def _m009_exact_fastpath_key(conn: Connection) -> None:
    """experiences.messages_hash_v1: the whitespace-collapsing keys migration 5 stored move here
    (kept, never looked up); messages_hash is NULL for those rows, and is the exact key from now on."""
    conn.exec_driver_sql("ALTER TABLE experiences ADD COLUMN messages_hash_v1 VARCHAR(64)")
    conn.exec_driver_sql("UPDATE experiences SET messages_hash_v1 = messages_hash, messages_hash = NULL "
                         "WHERE messages_hash IS NOT NULL")


def _m010_ledger_chains(conn: Connection) -> None:
    """ledger.instance_id and chain_seq: one hash chain per router instance, numbered 1, 2, 3 ...
    within it (entries before 10: the chain ``legacy``, chain_seq = seq); experiences.instance_id
    (the router that stored it; NULL before 10). PostgreSQL: the sequence ``ledger_seq_global``,
    from which ``ledger.seq`` is drawn without a lock shared by every chain."""
    conn.exec_driver_sql("ALTER TABLE ledger ADD COLUMN instance_id VARCHAR(64) NOT NULL DEFAULT 'legacy'")
    conn.exec_driver_sql("ALTER TABLE ledger ADD COLUMN chain_seq INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql("UPDATE ledger SET chain_seq = seq")
    conn.exec_driver_sql("CREATE UNIQUE INDEX ux_ledger_chain ON ledger (instance_id, chain_seq)")
    conn.exec_driver_sql("ALTER TABLE experiences ADD COLUMN instance_id VARCHAR(64)")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("CREATE SEQUENCE ledger_seq_global")
        conn.exec_driver_sql("SELECT setval('ledger_seq_global', COALESCE((SELECT MAX(seq) FROM ledger), 0) + 1, false)")


MIGRATIONS: list[Migration] = [
    (1, "initial tables", _m001_initial),
    (2, "indexes", _m002_indexes),
    (3, "kv cache: surprise tier, background work", _m003_kv_cache),
    (4, "dream cycles", _m004_dream_cycles),
    (5, "fast path: messages hash", _m005_messages_hash),
    (6, "finish reason", _m006_finish_reason),
    (7, "failed call detail", _m007_failed_call_detail),
    (8, "verdicts", _m008_verdicts),
    (9, "exact fast-path key", _m009_exact_fastpath_key),
    (10, "ledger chains per instance", _m010_ledger_chains),
]

#: pg_advisory_xact_lock key every migration transaction takes on PostgreSQL
MIGRATION_LOCK = 72150010


def _serialise(conn: Connection) -> None:
    """Inside a migration transaction: wait for any other process migrating the same database."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")


def latest_version() -> int:
    """The schema version this code writes (the highest migration number)."""
    return max(v for v, _, _ in MIGRATIONS)


def applied_versions(conn: Connection) -> set[int]:
    """Versions recorded in ``_migrations`` (empty when the table does not exist)."""
    if not inspect(conn).has_table("_migrations"):
        return set()
    return set(conn.execute(select(migrations_table.c.version)).scalars())


def migrate(engine: Engine) -> list[int]:
    """Apply every migration the database lacks, in order; return the versions applied now.

    Each migration and its ``_migrations`` row commit together. Safe to call
    on every open (idempotent) and from several processes (a migration that
    another process applied meanwhile is skipped).

    Raises:
        StoreError: the database was written by a newer dreamroute (it has a
            migration this code does not know), or a migration failed (the
            message names it; the database stays at the previous version).
    """
    engine = engine.execution_options(dreamroute_write=True)
    latest = latest_version()
    try:
        with engine.begin() as conn:
            _serialise(conn)
            migrations_table.create(conn, checkfirst=True)
            applied = applied_versions(conn)
    except SQLAlchemyError as e:
        raise StoreError(f"cannot open {engine.url} or read its schema version: {e}; "
                         "choose another --db or move it away") from e
    newer = sorted(v for v in applied if v > latest)
    if newer:
        raise StoreError(
            f"{engine.url} has schema version {max(newer)}, newer than this dreamroute "
            f"understands ({latest}); upgrade dreamroute, or choose another --db")
    done: list[int] = []
    for version, name, fn in MIGRATIONS:
        if version in applied:
            continue
        try:
            with engine.begin() as conn:
                _serialise(conn)
                if version in applied_versions(conn):   # another process got there first
                    continue
                fn(conn)
                conn.execute(insert(migrations_table).values(version=version, name=name,
                                                             applied_at=utc_now()))
        except SQLAlchemyError as e:
            raise StoreError(
                f"migration {version} ({name}) failed on {engine.url}: {e}; "
                "the database was left at the previous version") from e
        done.append(version)
    return done


def check_sqlite_file(path: Path) -> None:
    """Refuse, without writing anything, a file that is not a dreamroute database this code can use."""
    fix = "choose another --db or move it away"
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a database file; {fix}")
    if not path.exists():
        return
    if not os.access(path, os.R_OK):
        raise StoreError(f"cannot read {path} (permission denied); fix its permissions or {fix}")
    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if not head:
        return                                   # an empty file is an empty SQLite database
    if head != _SQLITE_MAGIC:
        raise StoreError(f"{path} is not a dreamroute database (not an SQLite file); {fix}")
    con = None
    try:
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "_migrations" not in tables:
            raise StoreError(f"{path} is an SQLite database but not a dreamroute one (tables: "
                             f"{', '.join(sorted(tables)[:5])}); {fix}")
        if tables:
            version = con.execute("SELECT MAX(version) FROM _migrations").fetchone()[0] or 0
            if version > latest_version():
                raise StoreError(f"{path} has schema version {version}, newer than this dreamroute "
                                 f"understands ({latest_version()}); upgrade dreamroute or {fix}")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a readable SQLite database ({e}); {fix}") from e
    finally:
        if con is not None:
            con.close()


def sqlite_engine(path: Path | None) -> Engine:
    """An engine whose connections use WAL, busy_timeout, foreign keys and explicit BEGINs."""
    if path is None:
        engine = create_engine("sqlite://", poolclass=StaticPool,
                               connect_args={"check_same_thread": False})
    else:
        engine = create_engine(URL.create("sqlite", database=str(path)),
                               connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None        # we emit BEGIN ourselves: DDL becomes transactional
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA foreign_keys = ON")
        if path is not None:
            cur.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before it returns, so the ledger anchor written after it
            # (store/anchor.py) can never be ahead of the database, not even after a power loss
            cur.execute("PRAGMA synchronous = FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("dreamroute_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
