"""``Store``: model versions, trust, experiences, the ledger, runs and calibration in one database.

SQLite by default (one file, WAL, ``busy_timeout`` 30 s; writes take ``BEGIN
IMMEDIATE`` so routers in several processes serialise instead of failing), or a
PostgreSQL URL (``postgresql+psycopg://user:pw@host:5432/db``, the ``postgres`` extra)
for several routers sharing trust. Every public write is one transaction: it commits
whole or not at all. Trust changes are computed from the locked row inside it
(:mod:`~dreamroute.store.trust_rows`), so concurrent writers never lose an update; each
store object (router instance) appends to its own ledger chain (``instance_id``).
Thread-safe within a process. All timestamps are UTC ISO-8601 strings.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import func, insert, or_, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError

from dreamroute.errors import StoreError
from dreamroute.store import schema as T
from dreamroute.store.anchor import LedgerAnchor
from dreamroute.store.ledger import (
    CHAIN_KEY, CHAIN_LOCK, HEAD_KEY, LEGACY_CHAIN, VerifyReport, append_entries, verify,
)
from dreamroute.store.migrations import check_sqlite_file, migrate, sqlite_engine
from dreamroute.store.runs import RunsAndCalibration, read_calibration
from dreamroute.store.schema import ModelVersion, TrustRow, TrustUpdate, prompt_hash
from dreamroute.store.sync import experiences_since
from dreamroute.store.trust_rows import apply_trust, copy_applied, lock_rows
from dreamroute.config.db_url import display, is_url
from dreamroute.store.url import server_engine
from dreamroute.store.versions import VersionsAndCycles

__all__ = ["Store", "ModelVersion", "TrustRow", "TrustUpdate", "VerifyReport", "prompt_hash", "read_calibration"]

_APPLIED_KEY = "dreamroute_trust_applied"   # Connection.info: (caller's updates, as applied) of this write


class Store(VersionsAndCycles, RunsAndCalibration):
    """The dreamroute database.

    Args:
        path: SQLite file (parent directories are created), ``None`` or
            ``":memory:"`` for a private in-memory store, or an SQLAlchemy URL:
            ``postgresql+psycopg://user:pw@host:5432/db`` (``postgresql://`` means the same
            driver), or ``sqlite:///file`` (the same as ``file``). A string that starts with
            ``scheme://`` or ``scheme+driver://`` is a URL, never a file name.
        instance_id: this router instance's id: its ledger chain and the instance its
            experiences are stored under (1-64 characters, not ``legacy``); default a new
            uuid (hex) per Store object. Reuse one only to continue a chain after a restart,
            never in two stores open at once.

    Attributes:
        path: the SQLite file, or None (in memory or a server URL).
        url: the SQLAlchemy URL, password hidden.
        instance_id: see Args.
        dialect: ``"sqlite"`` or ``"postgresql"``.
        anchor: the ledger heads kept beside the SQLite file (:class:`~dreamroute.store.anchor.LedgerAnchor`,
            moved after each commit that appends entries); None in memory or for a server URL
            (those have no anchor: see :mod:`dreamroute.store.anchor`).

    Raises:
        StoreError: the file is not SQLite, not a dreamroute database,
            unreadable, or from a newer schema (the file is left untouched);
            the database cannot be created or migrated; a server URL's driver is
            missing or its server unreachable (the message names the URL, password
            hidden, and the fix); a bad ``instance_id``.
    """

    def __init__(self, path: str | Path | None = None, *, instance_id: str | None = None):
        if isinstance(path, str) and path.strip().lower().startswith("sqlite:"):   # an SQLite URL: its file
            path = make_url(path.strip()).database or None
        memory = path is None or str(path) == ":memory:"
        server = is_url(path)
        self.path: Path | None = None if memory or server else Path(path).expanduser()
        if instance_id is not None and not (0 < len(instance_id) <= 64 and instance_id != LEGACY_CHAIN
                                            and instance_id.strip() == instance_id):
            raise StoreError(f"instance_id {instance_id!r} must be 1-64 characters without surrounding "
                             f"spaces and not {LEGACY_CHAIN!r}")
        self.instance_id = instance_id or uuid.uuid4().hex
        fresh = self.path is not None and (not self.path.exists() or self.path.stat().st_size == 0)
        try:
            if self.path is not None:
                check_sqlite_file(self.path)
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._engine = server_engine(path) if server else sqlite_engine(self.path)
        except OSError as e:
            raise StoreError(f"cannot create the store at {display(path)}: {e}; choose another --db") from e
        self.url = self._engine.url.render_as_string(hide_password=True)
        self.dialect = self._engine.dialect.name
        self._wengine = self._engine.execution_options(dreamroute_write=True)
        self._wlock = threading.RLock()
        self._rlock = self._wlock if memory else nullcontext()
        try:
            self.applied_migrations = migrate(self._engine)   # raises StoreError only
            self.anchor = LedgerAnchor(self.path, self._engine, fresh=fresh) if self.path else None
        except StoreError:
            self._engine.dispose()
            raise
        except SQLAlchemyError as e:      # reading the ledger head for the anchor
            self._engine.dispose()
            raise StoreError(f"cannot read the ledger of {self.url}: {e}") from e

    # -- plumbing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Write the ledger anchor if a commit left it behind, and close every connection
        (SQLite then folds the WAL back into the file)."""
        if self.anchor is not None:
            self.anchor.flush()
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction: commits on success, rolls back on any exception; after a
        commit that appended ledger entries, the anchor is moved to the new head."""
        with self._wlock:
            head, applied = None, []
            try:
                with self._wengine.begin() as conn:
                    conn.info.pop(HEAD_KEY, None)   # left by a transaction that rolled back
                    conn.info[CHAIN_KEY] = self.instance_id
                    conn.info[_APPLIED_KEY] = applied
                    if self.dialect == "postgresql":   # this chain's appender first: one lock order everywhere
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:c))"),
                                     {"k": CHAIN_LOCK, "c": self.instance_id})
                    yield conn
                    head = self.anchor.staged(conn) if self.anchor is not None else None
            except SQLAlchemyError as e:
                raise StoreError(f"write to {self.url} failed and was rolled back: {e}") from e
            for targets, done in applied:   # committed: the callers' updates get the values written
                copy_applied(targets, done)
            if head is not None:
                self.anchor.committed(head)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._rlock:
            try:
                with self._engine.connect() as conn:
                    yield conn
            except SQLAlchemyError as e:
                raise StoreError(f"read from {self.url} failed: {e}") from e

    # -- trust --------------------------------------------------------------------------------
    def _trust_select(self):
        t, mv = T.trust, T.model_versions
        return select(t.c.model_version_id, mv.c.tier, mv.c.name.label("model"), t.c.context,
                      t.c.alpha, t.c.beta, t.c.count, t.c.updated_at).join(mv, mv.c.id == t.c.model_version_id)

    def get_trust(self, model_version_id: int, context: str) -> TrustRow | None:
        """The trust row of (model version, context), or None before its first update."""
        stmt = self._trust_select().where(T.trust.c.model_version_id == model_version_id,
                                          T.trust.c.context == context)
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return TrustRow(**row._mapping) if row is not None else None

    def trust_table(self) -> list[TrustRow]:
        """Every trust row, ordered by tier, model version and context."""
        stmt = self._trust_select().order_by(T.model_versions.c.tier, T.trust.c.model_version_id,
                                             T.trust.c.context)
        with self._read() as conn:
            return [TrustRow(**r._mapping) for r in conn.execute(stmt)]

    # -- experiences --------------------------------------------------------------------------
    def record(self, experiences: list[dict], trust_updates: list[TrustUpdate]) -> list[int]:
        """Write one request's experiences, trust updates and ledger entries in ONE transaction.

        ``experiences`` are dicts of experience columns (``schema.EXPERIENCE_COLUMNS``;
        role, prompt, tier, context required; ``request_id`` defaults to one new
        uuid for the call, ``prompt_hash`` to ``prompt_hash(prompt)``). Each
        TrustUpdate changes its trust row as its ``op`` says, from the row's value in the
        database under its lock, and appends a ``trust.update`` ledger entry to this
        store's chain; once committed, each TrustUpdate holds the before/after values
        written (set the in-memory trust from them). Each experience is stored under
        ``instance_id``. Returns the new experience ids, in input order.

        Raises:
            StoreError: an invalid field, an unknown model version, or a failed
                write; nothing of the call is kept.
        """
        return self.record_many([(experiences, trust_updates)])[0]

    def record_many(self, calls: list[tuple[list[dict], list[TrustUpdate]]]) -> list[list[int]]:
        """Several :meth:`record` calls ``(experiences, trust_updates)`` in ONE transaction (a group
        commit: one commit, one fsync, for several requests). Each call's rows and entries are
        what :meth:`record` writes for it (its own default request id), in the order given: the
        experiences first (one insert), then each call's trust updates and ledger entries, as
        consecutive record() calls would leave them. All or nothing is kept. Returns each call's
        new experience ids. Raises StoreError as :meth:`record`."""
        now = T.utc_now()
        rows: list[dict] = []
        spans: list[tuple[int, int]] = []
        for experiences, trust_updates in calls:
            request_id = str(uuid.uuid4())
            mine = [{**T.experience_row(e, request_id, now), "instance_id": self.instance_id} for e in experiences]
            for u in trust_updates:
                if u.experience_index is not None and not 0 <= u.experience_index < len(mine):
                    raise StoreError(f"TrustUpdate.experience_index {u.experience_index} is outside "
                                     f"the {len(mine)} experiences of this call")
            spans.append((len(rows), len(rows) + len(mine)))
            rows.extend(mine)
        with self._write() as conn:
            ids: list[int] = []
            if rows:
                stmt = insert(T.experiences).returning(T.experiences.c.id, sort_by_parameter_order=True)
                ids = list(conn.execute(stmt, rows).scalars())
            out = [ids[a:b] for a, b in spans]
            if self.dialect == "postgresql" and len(calls) > 1:   # one lock order for the whole batch
                lock_rows(conn, [u for _, us in calls for u in us], now)
            for (_, trust_updates), call_ids in zip(calls, out):
                self._apply_trust(conn, trust_updates, call_ids, now)
            return out

    def record_background(self, kind: str, tier: str, tokens: int, atp_joules: float, seconds: float, *,
                          model_version_id: int | None = None, conversation_id: str | None = None,
                          run_id: int | None = None, status: int | None = None, detail: str | None = None,
                          request_id: str | None = None) -> int:
        """Record work outside an answer and the ATP it cost (J): ``kind`` "prefill" (a warm handoff),
        "failed_call" (a backend call that failed: ``status`` its upstream HTTP status, ``detail`` the
        backend's message, ``request_id`` its request), "unanswered" (a request no tier could answer,
        ``detail`` why), "dream". Returns its id. Raises StoreError on a failed write."""
        row = dict(kind=kind, tier=tier, tokens=int(tokens), atp_joules=float(atp_joules), seconds=float(seconds),
                   model_version_id=model_version_id, conversation_id=conversation_id, run_id=run_id,
                   created_at=T.utc_now(), status=status, detail=detail, request_id=request_id)
        with self._write() as conn:
            return conn.execute(insert(T.background_work).returning(T.background_work.c.id), [row]).scalar_one()

    def background_atp(self, run_id: int | None = None) -> float:
        """Total ATP of recorded background work (of one run, or all), J."""
        b = T.background_work
        stmt = select(func.coalesce(func.sum(b.c.atp_joules), 0.0))
        if run_id is not None:
            stmt = stmt.where(b.c.run_id == run_id)
        with self._read() as conn:
            return float(conn.execute(stmt).scalar_one())

    def _apply_trust(self, conn: Connection, updates: list[TrustUpdate], ids: list[int], now: str) -> None:
        """Apply ``updates`` to their locked rows from the database's values, with their
        ``trust.update`` entries and verdicts (:func:`~dreamroute.store.trust_rows.apply_trust`);
        once the write commits, ``updates`` hold the values written."""
        if updates:
            conn.info[_APPLIED_KEY].append((updates, apply_trust(conn, updates, ids, now)))

    def experiences(self, columns: list[str] | None = None, *, run_id: int | None = None,
                    tier: str | None = None, since_id: int | None = None) -> list[dict]:
        """Experiences as dicts (``columns``, default all incl. ``id``), in id order.

        Filters: ``run_id``, ``tier``, ``since_id`` (ids greater than it).
        Raises StoreError for an unknown column.
        """
        cols = list(columns) if columns else ["id", *T.EXPERIENCE_COLUMNS]
        bad = [c for c in cols if c not in T.experiences.c]
        if bad:
            raise StoreError(f"unknown experience columns {bad}; known: id, {', '.join(T.EXPERIENCE_COLUMNS)}")
        e = T.experiences
        stmt = select(*[e.c[c] for c in cols]).order_by(e.c.id)
        if run_id is not None:
            stmt = stmt.where(e.c.run_id == run_id)
        if tier is not None:
            stmt = stmt.where(e.c.tier == tier)
        if since_id is not None:
            stmt = stmt.where(e.c.id > since_id)
        with self._read() as conn:
            return [dict(zip(cols, r)) for r in conn.execute(stmt)]

    def experiences_since(self, last_id: int, *, exclude_instance: str | None = None,
                          columns: list[str] | None = None, limit: int | None = None) -> list[dict]:
        """Experiences with id > ``last_id`` in id order, as dicts of ``columns`` (default
        ``store.sync.SYNC_COLUMNS``), leaving out those ``exclude_instance`` stored (e.g. this
        store's own ``instance_id``: what other routers stored). See :mod:`dreamroute.store.sync`
        (``SyncCursor`` also finds rows that committed late, below an id already seen)."""
        return experiences_since(self, last_id, exclude_instance=exclude_instance, columns=columns, limit=limit)

    def count_experiences(self) -> int:
        """Number of stored experiences."""
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(T.experiences)).scalar_one()

    def judged_answers(self) -> list[dict]:
        """The fast path's evidence: every answer (non-audit experience) with a message-list key
        and a success or failure on record, in id order, as dicts of ``id, request_id,
        messages_hash, tier, context, response, prompt_tokens, completion_tokens, outcome,
        witness, finish_reason``."""
        e = T.experiences
        cols = ["id", "request_id", "messages_hash", "tier", "context", "response", "prompt_tokens",
                "completion_tokens", "outcome", "witness", "finish_reason"]
        stmt = (select(*[e.c[c] for c in cols])
                .where(e.c.messages_hash.is_not(None), e.c.role != "audit",
                       e.c.outcome.in_(("success", "failure")))
                .order_by(e.c.id))
        with self._read() as conn:
            return [dict(zip(cols, r)) for r in conn.execute(stmt)]

    def count_successes(self, tier: str, witnesses: tuple[str, ...], *, since: str | None = None) -> int:
        """Experiences of ``tier`` judged a success by a witness starting with one of ``witnesses``
        (e.g. ``("ground_truth", "user", "audit:")``), created after ``since`` (ISO time) if given."""
        e = T.experiences
        stmt = select(func.count()).select_from(e).where(
            e.c.tier == tier, e.c.outcome == "success", or_(*[e.c.witness.startswith(w) for w in witnesses]))
        if since is not None:
            stmt = stmt.where(e.c.created_at > since)
        with self._read() as conn:
            return conn.execute(stmt).scalar_one()

    def experiences_for_request(self, request_id: str) -> list[dict]:
        """Every experience (all columns) of one request, in id order; [] for an unknown id."""
        e = T.experiences
        with self._read() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(e).where(e.c.request_id == request_id).order_by(e.c.id))]

    def set_outcome(self, experience_id: int, outcome: str, witness: str) -> None:
        """Set a later witnessed outcome (e.g. user feedback) without touching trust.

        Raises StoreError for an unknown outcome or experience id.
        """
        self.record_outcome(experience_id, outcome, witness, None)

    def record_outcome(self, experience_id: int, outcome: str, witness: str,
                       trust_update: TrustUpdate | None) -> None:
        """Set a later witnessed outcome and apply its trust update (ledgered) in ONE transaction.

        ``trust_update.experience_id`` (or ``experience_id`` when unset) is what
        its ledger entry cites; it is applied as :meth:`record` applies one (from the row in
        the database, by its ``op``) and holds the values written once this returns. Raises
        StoreError for an unknown outcome or experience id; nothing is written then.
        """
        if outcome not in T.OUTCOMES:
            raise StoreError(f"unknown outcome {outcome!r}; use one of {T.OUTCOMES}")
        with self._write() as conn:
            n = conn.execute(update(T.experiences).where(T.experiences.c.id == experience_id)
                             .values(outcome=outcome, witness=witness)).rowcount
            if n != 1:
                raise StoreError(f"no experience {experience_id} in {self.url}")
            if trust_update is not None:
                cited = trust_update
                if trust_update.experience_id is None:
                    cited = dataclasses.replace(trust_update, experience_id=experience_id, experience_index=None)
                self._apply_trust(conn, [cited], [], T.utc_now())
        if trust_update is not None and cited is not trust_update:
            copy_applied([trust_update], [cited])   # the caller's update holds the values written too

    # -- ledger -------------------------------------------------------------------------------
    def append_ledger(self, entity: str, action: str, delta: dict, witnesses: list[str]) -> int:
        """Append one entry (promotion, calibration, ...) in its own transaction; returns its seq."""
        with self._write() as conn:
            return append_entries(conn, [(entity, action, delta, list(witnesses))], T.utc_now())[0]

    def ledger_entries(self, limit: int | None = None) -> list[dict]:
        """Entries (seq, created_at, entity, action, delta, witnesses, prev_hash, hash), oldest first;
        with ``limit``, only the last ``limit`` of them. delta/witnesses are decoded JSON."""
        stmt = select(T.ledger).order_by(T.ledger.c.seq.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        out = [{**r._mapping, "delta": json.loads(r.delta), "witnesses": json.loads(r.witnesses)}
               for r in rows]
        return out[::-1]

    def verify_ledger(self) -> VerifyReport:
        """Re-walk every chain (one per router instance) and cross-check trust, model status and
        calibration against all of them together (see ``ledger.verify``), and, for an SQLite
        file, check each chain still reaches its anchored head (``store.anchor``; PostgreSQL and
        in-memory stores have no anchor)."""
        with self._read() as conn:
            report = verify(conn)
            return self.anchor.check(conn, report) if self.anchor is not None else report
