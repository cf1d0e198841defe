"""Model versions and DREAM cycles: the part of :class:`~dreamroute.store.store.Store` that serving
(the active version of each tier) and ``dream`` (candidates, promotion, rejection, rollback, the
``dream_cycles`` rows) use, as a mixin (it needs the store's ``_write``, ``_read``, ``_apply_trust``,
``dialect`` and ``url``). Every status change is ledgered (``model.activate`` and so on)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from dreamroute.errors import StoreError
from dreamroute.store import schema as T
from dreamroute.store.ledger import append_entries, canonical_json
from dreamroute.store.schema import ModelVersion, TrustUpdate

_STATUS_ACTION = {"active": "model.activate", "candidate": "model.candidate",
                  "rejected": "model.reject", "retired": "model.retire"}
_VERSIONS_LOCK = 72150001                   # pg_advisory_xact_lock key of model-version changes


class VersionsAndCycles:
    """Model versions and DREAM cycles of a Store (mixed into it)."""

    def _lock_versions(self, conn: Connection) -> None:
        """Inside a write: serialise model-version changes with other processes (PostgreSQL; on
        SQLite the write lock already does), so two routers starting at once insert one row."""
        if self.dialect == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_VERSIONS_LOCK})")

    # -- model versions -----------------------------------------------------------------------
    def _set_status(self, conn: Connection, row: Any, status: str, witnesses: list[str],
                    reason: str, now: str) -> None:
        """Set ``row``'s status (retiring the tier's active one first when activating); ledgered."""
        mv, retired = T.model_versions, None
        if status == "active":
            retired = conn.execute(select(mv.c.id).where(mv.c.tier == row.tier, mv.c.status == "active",
                                                         mv.c.id != row.id)).scalar()
            conn.execute(update(mv).where(mv.c.tier == row.tier, mv.c.status == "active")
                         .values(status="retired"))
        conn.execute(update(mv).where(mv.c.id == row.id).values(status=status))
        delta = {"tier": row.tier, "identity": row.identity, "name": row.name,
                 "adapter_path": row.adapter_path, "parent_id": row.parent_id,
                 "from": row.status, "to": status, "retired": retired, "reason": reason}
        append_entries(conn, [(f"model_version:{row.id}", _STATUS_ACTION[status], delta,
                               list(witnesses))], now)

    def ensure_model_version(self, tier: str, identity: str, name: str) -> int:
        """Id of the active version of ``tier``, activating ``identity`` first when it is not.

        When the tier's active version already has this identity (base or a
        promoted adapter on it) its id is returned unchanged (its name updated).
        Otherwise the base row for (tier, identity) is reactivated or inserted,
        the previous active one becomes "retired", and a ``model.activate``
        entry is appended to the ledger.
        """
        mv, now = T.model_versions, T.utc_now()
        with self._write() as conn:
            self._lock_versions(conn)
            active = conn.execute(select(mv).where(mv.c.tier == tier, mv.c.status == "active")
                                  .order_by(mv.c.id.desc())).first()
            if active is not None and active.identity == identity:
                if active.name != name:
                    conn.execute(update(mv).where(mv.c.id == active.id).values(name=name))
                return active.id
            base = select(mv).where(mv.c.tier == tier, mv.c.identity == identity, mv.c.adapter_path.is_(None))
            row = conn.execute(base).first()
            if row is None:
                conn.execute(insert(mv).values(tier=tier, identity=identity, name=name,
                                               status="candidate", created_at=now))
                row = conn.execute(base).first()
            elif row.name != name:
                conn.execute(update(mv).where(mv.c.id == row.id).values(name=name))
            self._set_status(conn, row, "active", ["config"], "configured", now)
            return row.id

    def add_version(self, tier: str, identity: str, name: str, *, adapter_path: str | None,
                    parent_id: int | None, witnesses: list[str] = (), reason: str = "") -> int:
        """Insert a "candidate" version (e.g. a DREAM adapter on ``parent_id``); ledger ``model.candidate``.

        Raises StoreError when (tier, identity, adapter_path) already exists.
        """
        mv, now = T.model_versions, T.utc_now()
        with self._write() as conn:
            self._lock_versions(conn)
            vid = conn.execute(insert(mv).values(
                tier=tier, identity=identity, name=name, adapter_path=adapter_path,
                parent_id=parent_id, status="candidate", created_at=now)).inserted_primary_key[0]
            row = conn.execute(select(mv).where(mv.c.id == vid)).first()
            self._set_status(conn, row, "candidate", witnesses, reason, now)
            return vid

    def set_version_status(self, version_id: int, status: str, *, witnesses: list[str] = (),
                           reason: str = "") -> None:
        """Promote ("active": the tier's active one is retired), reject or retire a version; ledgered.

        Raises StoreError for an unknown status or version id."""
        if status not in T.STATUSES:
            raise StoreError(f"unknown model version status {status!r}; use one of {T.STATUSES}")
        with self._write() as conn:
            self._lock_versions(conn)
            row = conn.execute(select(T.model_versions).where(T.model_versions.c.id == version_id)).first()
            if row is None:
                raise StoreError(f"no model version {version_id} in {self.url}")
            self._set_status(conn, row, status, witnesses, reason, T.utc_now())

    def promote_version(self, version_id: int, trust_updates: list[TrustUpdate], *, witnesses: list[str],
                        reason: str) -> None:
        """Activate a candidate (the tier's active version is retired) and set its starting trust,
        in ONE transaction: serving and trust change together or not at all. Ledger:
        ``model.activate`` then one ``trust.update`` per row. Raises StoreError."""
        with self._write() as conn:
            self._lock_versions(conn)
            row = conn.execute(select(T.model_versions).where(T.model_versions.c.id == version_id)).first()
            if row is None:
                raise StoreError(f"no model version {version_id} in {self.url}")
            self._set_status(conn, row, "active", witnesses, reason, T.utc_now())
            self._apply_trust(conn, trust_updates, [], T.utc_now())

    # -- dream cycles -------------------------------------------------------------------------
    def start_cycle(self, student: str, teacher: str, base_version_id: int, workdir: str, config: dict) -> int:
        """A new ``running`` DREAM cycle row; returns its id."""
        now = T.utc_now()
        with self._write() as conn:
            return conn.execute(insert(T.dream_cycles).values(
                student=student, teacher=teacher, base_version_id=base_version_id, status="running",
                stage="started", workdir=workdir, config=canonical_json(config), result="{}",
                created_at=now, updated_at=now)).inserted_primary_key[0]

    def update_cycle(self, cycle_id: int, *, stage: str | None = None, status: str | None = None,
                     result: dict | None = None, version_id: int | None = None,
                     workdir: str | None = None) -> None:
        """Record a cycle's progress (the stage just completed, its results so far)."""
        values: dict[str, Any] = {"updated_at": T.utc_now()}
        if stage is not None:
            values["stage"] = stage
        if status is not None:
            values["status"] = status
        if result is not None:
            values["result"] = canonical_json(result)
        if version_id is not None:
            values["version_id"] = version_id
        if workdir is not None:
            values["workdir"] = workdir
        with self._write() as conn:
            conn.execute(update(T.dream_cycles).where(T.dream_cycles.c.id == cycle_id).values(**values))

    def cycles(self, *, student: str | None = None, status: str | None = None) -> list[dict]:
        """DREAM cycles (newest first) as dicts, ``config`` and ``result`` parsed."""
        c = T.dream_cycles
        stmt = select(c).order_by(c.c.id.desc())
        if student is not None:
            stmt = stmt.where(c.c.student == student)
        if status is not None:
            stmt = stmt.where(c.c.status == status)
        with self._read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for r in rows:
            r["config"], r["result"] = json.loads(r["config"]), json.loads(r["result"])
        return rows

    def active_versions(self) -> dict[str, ModelVersion]:
        """tier -> its active ModelVersion."""
        mv = T.model_versions
        with self._read() as conn:
            rows = conn.execute(select(mv).where(mv.c.status == "active").order_by(mv.c.id)).all()
        return {r.tier: ModelVersion(**r._mapping) for r in rows}

    def get_version(self, version_id: int) -> ModelVersion:
        """The ModelVersion with this id. Raises StoreError when there is none."""
        with self._read() as conn:
            row = conn.execute(select(T.model_versions)
                               .where(T.model_versions.c.id == version_id)).first()
        if row is None:
            raise StoreError(f"no model version {version_id} in {self.url}")
        return ModelVersion(**row._mapping)
