"""Trust rows changed atomically: under the row's lock, from its value in the database.

Several routers (threads or processes) may update one trust row (model version ×
context) at once. A writer that computed α/β in memory and wrote the result back would
lose the other's update (read-modify-write). Here every change is computed inside the
store's write transaction from the row as the database holds it:

1. each row the call touches is read and locked in one statement, in key order (so two
   writers never wait on each other in a cycle): ``INSERT ... ON CONFLICT DO UPDATE SET
   alpha = alpha RETURNING alpha, beta, count`` (a missing row is created from the update's
   before values: the prior). PostgreSQL locks the row it conflicts on until the transaction
   ends (a second writer waits, then reads the first one's committed value); on SQLite the
   transaction already holds the database's write lock (``BEGIN IMMEDIATE``);
2. the new value is computed from the locked row by the update's ``op`` (see
   :class:`~dreamroute.store.schema.TrustUpdate`: set, ``observe`` with forgetting γ,
   ``replace`` a verdict with weight γ^d, d from the row's count now) with the formulas of
   :mod:`dreamroute.signals.trust`;
3. the row is updated, and the ``trust.update`` ledger entry and the verdict are written
   in the same transaction, carrying the true before and after.

So N writers × M observations of one row leave exactly the sequential result, and the
ledger entries of every chain link before → after.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from dreamroute.errors import StoreError
from dreamroute.store.ledger import append_entries, trust_entries
from dreamroute.store.schema import TrustUpdate, trust, verdicts
from dreamroute.store.verdicts import record_verdicts
from dreamroute.signals.trust import replace_reward
from dreamroute.signals.trust import update as observe

OPS = (None, "observe", "replace")


_LOCK_ROW: dict[str, object] = {}    # dialect -> the statement (built once: building costs ~0.5 ms)
_SET_ROW = (update(trust).where(trust.c.model_version_id == bindparam("k_mv"), trust.c.context == bindparam("k_ctx"))
            .values(alpha=bindparam("a"), beta=bindparam("b"), count=bindparam("n"), updated_at=bindparam("now")))


def _lock_stmt(dialect: str):
    """``INSERT ... ON CONFLICT DO UPDATE SET alpha = alpha RETURNING alpha, beta, count``: the
    row's value now, inserted from the given before values when it did not exist, and locked
    until the transaction ends (PostgreSQL locks the row it conflicts on; SQLite's write
    transaction holds the whole database)."""
    if dialect not in _LOCK_ROW:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        t = trust.c
        ins = dialect_insert(trust).values(model_version_id=bindparam("mv"), context=bindparam("ctx"),
                                           alpha=bindparam("a"), beta=bindparam("b"), count=0.0,
                                           updated_at=bindparam("now"))
        _LOCK_ROW[dialect] = ins.on_conflict_do_update(index_elements=[t.model_version_id, t.context],
                                                       set_={"alpha": t.alpha}) \
            .returning(t.alpha, t.beta, t["count"])
    return _LOCK_ROW[dialect]


def _lock(conn: Connection, key: tuple[int, str], before: TrustUpdate, now: str) -> tuple[float, float, float]:
    """(alpha, beta, count) of the row ``key`` as the database holds it (created from ``before``'s
    before values when missing), locked until the transaction ends."""
    row = conn.execute(_lock_stmt(conn.dialect.name), {"mv": key[0], "ctx": key[1], "a": float(before.alpha_before),
                                                      "b": float(before.beta_before), "now": now}).first()
    return float(row[0]), float(row[1]), float(row[2])


def _held_verdict(conn: Connection, u: TrustUpdate, eid: int | None) -> dict | None:
    """The verdict the cited experience holds now (read under the row lock), as ``replaces`` wants it."""
    if eid is None:
        return None
    v = conn.execute(select(verdicts).where(verdicts.c.experience_id == eid)).first()
    if v is None or (v.model_version_id, v.context) != (u.model_version_id, u.context):
        return None
    return {"reward": float(v.reward), "outcome": v.outcome, "witness": v.witness, "slot_count": float(v.slot_count)}


def _apply_one(conn: Connection, u: TrustUpdate, cur: tuple[float, float, float], eid: int | None) -> TrustUpdate:
    """``u`` as applied to the row value ``cur``: true before and after (a new TrustUpdate)."""
    a, b, n = cur
    if u.op not in OPS:
        raise StoreError(f"TrustUpdate.op {u.op!r} unknown; use one of {OPS}")
    op, replaces = u.op, u.replaces
    if op is not None and u.reward is None:
        raise StoreError(f"TrustUpdate.op {op!r} needs a reward in [0, 1]")
    held = _held_verdict(conn, u, eid) if op is not None and eid is not None else None
    if op == "observe" and held is not None and u.experience_index is None:
        op = "replace"             # another writer gave this response its verdict meanwhile: replace it
    try:
        if op is None:
            after = (u.alpha_after, u.beta_after, u.count_after)
        elif op == "observe":
            after = (*observe(a, b, u.reward, u.gamma, u.prior), n + 1)
            replaces = None
        else:
            base = held or replaces
            if base is None:
                raise StoreError(f"TrustUpdate.op 'replace' of experience {eid} has no verdict to replace")
            w = u.gamma ** max(0.0, n - float(base["slot_count"]))
            after = (*replace_reward(a, b, float(base["reward"]), u.reward, w, u.prior), n)
            replaces = {**(replaces or {}), **base, "weight": w}
    except ValueError as e:        # a reward, weight or γ out of range
        raise StoreError(f"trust update of model version {u.model_version_id} / {u.context}: {e}") from e
    return dataclasses.replace(u, alpha_before=a, beta_before=b, count_before=n, alpha_after=float(after[0]),
                               beta_after=float(after[1]), count_after=float(after[2]), replaces=replaces,
                               op=op)


def apply_trust(conn: Connection, updates: list[TrustUpdate], ids: list[int], now: str) -> list[TrustUpdate]:
    """Inside the store's write transaction: apply ``updates`` (in order) to their locked rows,
    append their ``trust.update`` entries and record their verdicts. ``ids``: the call's new
    experience ids that ``experience_index`` points into. Returns the updates as applied
    (true before/after from the database, in input order); the caller copies them into its
    own objects once the transaction has committed. Raises StoreError (bad op or values);
    SQLAlchemyError from the database (e.g. an unknown model version)."""
    if not updates:
        return []
    firsts: dict[tuple[int, str], TrustUpdate] = {}
    for u in updates:
        firsts.setdefault((u.model_version_id, u.context), u)
    state = {k: _lock(conn, k, firsts[k], now) for k in sorted(firsts)}   # key order: no lock cycles
    applied = []
    for u in updates:
        key = (u.model_version_id, u.context)
        eid = ids[u.experience_index] if u.experience_index is not None else u.experience_id
        done = _apply_one(conn, u, state[key], eid)
        state[key] = (done.alpha_after, done.beta_after, done.count_after)
        applied.append(done)
    conn.execute(_SET_ROW, [{"k_mv": mv, "k_ctx": ctx, "a": a, "b": b, "n": n, "now": now}
                            for (mv, ctx), (a, b, n) in state.items()])
    seqs = append_entries(conn, trust_entries(applied, ids), now)
    record_verdicts(conn, applied, ids, seqs, now)
    return applied


def lock_rows(conn: Connection, updates: list[TrustUpdate], now: str) -> None:
    """Lock every row ``updates`` touch, in key order, before any is changed: what a transaction
    holding several calls' updates (``Store.record_many``) does first on PostgreSQL, so that it
    takes its row locks in one order, as a single call's :func:`apply_trust` does (two such
    transactions could otherwise wait on each other in a cycle). A missing row is created from
    the first update's before values, as :func:`apply_trust` would create it."""
    firsts: dict[tuple[int, str], TrustUpdate] = {}
    for u in updates:
        firsts.setdefault((u.model_version_id, u.context), u)
    for k in sorted(firsts):
        _lock(conn, k, firsts[k], now)


def copy_applied(targets: list[TrustUpdate], applied: list[TrustUpdate]) -> None:
    """After the commit: give the caller's updates the values as applied (before, after, op,
    ``replaces``), so it can set its in-memory trust from the database's row."""
    for u, done in zip(targets, applied):
        for f in ("alpha_before", "beta_before", "count_before", "alpha_after", "beta_after", "count_after",
                  "replaces", "op"):
            setattr(u, f, getattr(done, f))
