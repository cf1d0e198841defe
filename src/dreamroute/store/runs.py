"""Runs (resumable workload attempts) and speed calibration: the part of :class:`~dreamroute.store.store.Store`
that ``run``/``simulate`` and ``bench`` use, as a mixin (it needs the store's ``_write``,
``_read`` and ``url``); plus :func:`read_calibration` of another store, read-only."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import create_engine, func, insert, select, update

from dreamroute.errors import StoreError
from dreamroute.store import schema as T
from dreamroute.store.ledger import append_entries, canonical_json


class RunsAndCalibration:
    """Runs and calibration of a Store (mixed into it)."""

    # -- runs ---------------------------------------------------------------------------------
    def start_run(self, workload: str, workload_digest: str, policy: str, seed: int,
                  budget: float | None, *, fresh: bool) -> int:
        """Run id to write to: the latest attempt of (workload_digest, policy, seed), or a new
        attempt when ``fresh`` or none exists. Earlier attempts are kept, never deleted."""
        r = T.runs
        with self._write() as conn:
            last = conn.execute(select(r.c.id, r.c.attempt).where(
                r.c.workload_digest == workload_digest, r.c.policy == policy, r.c.seed == seed)
                .order_by(r.c.attempt.desc()).limit(1)).first()
            if last is not None and not fresh:
                return last.id
            return conn.execute(insert(r).values(
                workload=workload, workload_digest=workload_digest, policy=policy, seed=seed,
                budget=budget, attempt=(last.attempt + 1) if last else 1, status="running",
                started_at=T.utc_now())).inserted_primary_key[0]

    def finish_run(self, run_id: int) -> None:
        """Mark a run finished (UTC finish time). Raises StoreError for an unknown run."""
        with self._write() as conn:
            n = conn.execute(update(T.runs).where(T.runs.c.id == run_id)
                             .values(status="finished", finished_at=T.utc_now())).rowcount
            if n != 1:
                raise StoreError(f"no run {run_id} in {self.url}")

    def graded_items(self, run_id: int) -> set[str]:
        """item_keys that already have a "chosen" experience in this run (skip them on resume)."""
        e = T.experiences
        stmt = select(e.c.item_key).distinct().where(e.c.run_id == run_id, e.c.role == "chosen",
                                                     e.c.item_key.is_not(None))
        with self._read() as conn:
            return set(conn.execute(stmt).scalars())

    def run_info(self, run_id: int) -> dict:
        """The run row as a dict, plus ``experiences`` (count) and ``graded`` (distinct items).
        Raises StoreError for an unknown run."""
        e = T.experiences
        with self._read() as conn:
            row = conn.execute(select(T.runs).where(T.runs.c.id == run_id)).first()
            if row is None:
                raise StoreError(f"no run {run_id} in {self.url}")
            n = conn.execute(select(func.count()).where(e.c.run_id == run_id)).scalar_one()
        return {**row._mapping, "experiences": n, "graded": len(self.graded_items(run_id))}

    # -- calibration --------------------------------------------------------------------------
    def save_calibration(self, identity: str, tier: str, values: dict) -> None:
        """Store ``dreamroute bench`` results for a model identity (replacing older ones) and
        append a ``calibration`` ledger entry. ``values``: prefill_s_per_token, decode_s_per_token,
        load_s, ttft_s (seconds), prefill_tok_s, decode_tok_s (tokens/s), rss_mb, ..."""
        now = T.utc_now()
        try:
            values = json.loads(canonical_json(values))
        except (TypeError, ValueError) as e:
            raise StoreError(f"calibration values are not JSON: {e}") from e
        c = T.calibration
        with self._write() as conn:
            conn.execute(c.delete().where(c.c.identity == identity))
            conn.execute(insert(c).values(identity=identity, tier=tier,
                                          values=canonical_json(values), updated_at=now))
            append_entries(conn, [(f"calibration:{identity}", "calibration",
                                   {"tier": tier, "values": values}, ["bench"])], now)

    def get_calibration(self, identity: str) -> dict | None:
        """The saved values plus ``identity``, ``tier`` and ``updated_at``; None when never benched."""
        c = T.calibration
        with self._read() as conn:
            row = conn.execute(select(c).where(c.c.identity == identity)).first()
        if row is None:
            return None
        m = row._mapping
        return {**json.loads(m["values"]), "identity": m["identity"], "tier": m["tier"],
                "updated_at": m["updated_at"]}


def read_calibration(path: str | Path, identity: str) -> dict | None:
    """:meth:`Store.get_calibration` from the SQLite file at ``path``, opened read-only and never
    migrated (another store's calibration, e.g. the machine's default store, is read without
    changing it). None when the file, its calibration table or the identity is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    engine = create_engine(f"sqlite:///file:{p}?mode=ro&uri=true")
    c = T.calibration
    try:
        with engine.connect() as conn:
            row = conn.execute(select(c).where(c.c.identity == identity)).first()
    except Exception:  # not a store, an older schema, locked: no calibration from it
        return None
    finally:
        engine.dispose()
    if row is None:
        return None
    m = row._mapping
    return {**json.loads(m["values"]), "identity": m["identity"], "tier": m["tier"], "updated_at": m["updated_at"]}

