"""The ledger: an append-only, hash-chained record of every trust change.

Each entry's ``hash`` is the sha256 (hex) of the canonical JSON of
``{prev_hash, seq, created_at, entity, action, delta, witnesses}`` (sorted
keys, separators ``(",", ":")``, no NaN/inf); ``prev_hash`` is the previous
entry's hash, ``"0" * 64`` for seq 1. ``verify`` re-walks the chain and
cross-checks it against the tables it is the history of (trust, model
version status, calibration), so that an edited entry, a removed entry
(middle or tail) and a row changed behind the ledger's back are each reported.

The end of the chain is anchored outside the database (:mod:`dreamroute.store.anchor`):
after each commit that appended entries, the head (seq and hash) is written to a file
next to the SQLite file, so removing trailing entries is detected even when the trust
rows (and every other table) were rolled back to match them.

Writers: ``append_entries`` (inside the caller's transaction) and
``trust_entries`` (the ``trust.update`` delta format ``verify`` relies on).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from dreamroute.errors import LedgerError, StoreError
from dreamroute.store.schema import (
    GENESIS_HASH, TrustUpdate, calibration, ledger, model_versions, trust,
)

TRUST_ENTITY_PREFIX = "model_version:"
TRUST_FIELDS = ("alpha_after", "beta_after", "count_after")
STATUS_ACTIONS = ("model.activate", "model.candidate", "model.reject", "model.retire")
HEAD_KEY = "dreamroute_ledger_head"   # Connection.info key: (seq, hash) appended by this transaction


def _json_default(obj: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-able; anything else is a TypeError."""
    if hasattr(obj, "tolist"):      # numpy scalar or array
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable in a ledger entry")


def canonical_json(value: Any) -> str:
    """Canonical JSON text: ``json.dumps(sort_keys=True, separators=(",", ":"))`` (ASCII, so
    any JSON library can reproduce it), NaN/inf rejected (ValueError), numpy made plain."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False,
                      default=_json_default)


def entry_hash(prev_hash: str, seq: int, created_at: str, entity: str, action: str,
               delta: dict, witnesses: list[str]) -> str:
    """sha256 hex digest (64 chars) of one entry's canonical JSON, chained to ``prev_hash``."""
    payload = {"prev_hash": prev_hash, "seq": seq, "created_at": created_at, "entity": entity,
               "action": action, "delta": delta, "witnesses": list(witnesses)}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def trust_entity(model_version_id: int, context: str) -> str:
    """Ledger entity naming one trust row: ``model_version:{id}/{context}``."""
    return f"{TRUST_ENTITY_PREFIX}{model_version_id}/{context}"


def parse_trust_entity(entity: str) -> tuple[int, str] | None:
    """(model_version_id, context) from a trust entity, None for any other entity."""
    if not entity.startswith(TRUST_ENTITY_PREFIX) or "/" not in entity:
        return None
    mv, _, context = entity[len(TRUST_ENTITY_PREFIX):].partition("/")
    try:
        return int(mv), context
    except ValueError:
        return None


def append_entries(conn: Connection, entries: list[tuple[str, str, dict, list[str]]], now: str) -> list[int]:
    """Chain ``(entity, action, delta, witnesses)`` entries onto the ledger inside the caller's
    write transaction (which must hold the write lock: BEGIN IMMEDIATE on SQLite); returns their seqs.

    Raises StoreError when a delta is not JSON (NaN, inf, an unknown type)."""
    if not entries:
        return []
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7215)")   # one appender at a time
    last = conn.execute(select(ledger.c.seq, ledger.c.hash)
                        .order_by(ledger.c.seq.desc()).limit(1)).first()
    seq, prev = (last.seq, last.hash) if last else (0, GENESIS_HASH)
    rows = []
    for entity, action, delta, witnesses in entries:
        seq += 1
        try:
            delta = json.loads(canonical_json(delta))   # numpy -> python, int keys -> str
            witnesses = [str(w) for w in witnesses]
            h = entry_hash(prev, seq, now, entity, action, delta, witnesses)
        except (TypeError, ValueError) as e:
            raise StoreError(f"ledger entry {entity} {action} is not canonical JSON: {e}") from e
        rows.append({"seq": seq, "created_at": now, "entity": entity, "action": action,
                     "delta": canonical_json(delta), "witnesses": canonical_json(witnesses),
                     "prev_hash": prev, "hash": h})
        prev = h
    conn.execute(insert(ledger), rows)
    conn.info[HEAD_KEY] = (seq, prev)   # the new head, for the anchor written after commit
    return [r["seq"] for r in rows]


def _mean(alpha: float, beta: float) -> float | None:
    return alpha / (alpha + beta) if alpha + beta > 0 else None


def trust_entries(updates: list[TrustUpdate], ids: list[int]) -> list[tuple[str, str, dict, list[str]]]:
    """``trust.update`` entries for ``updates``; ``ids`` are the experience ids that
    ``experience_index`` points into. Delta: alpha/beta before and after, count_after,
    trust_before/after (posterior means), reason, experience_id; and, where the update sets
    a response's verdict, ``reward`` (and ``replaces``: the verdict a correction takes back)."""
    out = []
    for u in updates:
        delta = {"alpha_before": u.alpha_before, "beta_before": u.beta_before,
                 "alpha_after": u.alpha_after, "beta_after": u.beta_after,
                 "count_after": u.count_after, "trust_before": _mean(u.alpha_before, u.beta_before),
                 "trust_after": _mean(u.alpha_after, u.beta_after), "reason": u.reason,
                 "experience_id": ids[u.experience_index] if u.experience_index is not None
                 else u.experience_id}
        if u.reward is not None:
            delta["reward"] = u.reward
        if u.replaces is not None:
            delta["replaces"] = u.replaces
        out.append((trust_entity(u.model_version_id, u.context), "trust.update", delta, list(u.witnesses)))
    return out


@dataclass
class VerifyReport:
    """Result of ``verify``: ``ok`` when ``problems`` is empty; ``entries`` = entries read."""

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)

    def raise_if_bad(self) -> None:
        """Raise LedgerError listing the problems (first ten) when the ledger does not verify."""
        if not self.ok:
            more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
            raise LedgerError("the ledger does not verify: " + "; ".join(self.problems[:10]) + more
                              + ". Restore the database from a backup, or start a new --db.")


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)


def verify(conn: Connection) -> VerifyReport:
    """Walk the whole chain and cross-check it; never raises for a broken ledger.

    Checks, each reported as one line in ``problems``:
      * seq runs 1, 2, 3 ... (a gap means entries were removed);
      * each prev_hash equals the previous entry's hash;
      * each hash matches its recomputed value (an edited entry);
      * for each (model_version, context) the last entry with ``alpha_after``,
        ``beta_after`` and ``count_after`` equals the trust row (a removed
        tail or a trust row edited directly), and every trust row has entries;
      * likewise each calibration row equals its last ``calibration`` entry,
        and each model version's status the one its ``model.*`` entries
        (``to``, and ``retired`` for the version an activation retired) leave.
    An entry of another action at the very end of the chain has no table to
    be checked against, and a removed tail whose tables were rolled back to
    match leaves a valid shorter chain: neither shows here, only against the
    anchor (:mod:`dreamroute.store.anchor`, checked by ``Store.verify_ledger``).
    """
    problems: list[str] = []
    last_trust: dict[tuple[int, str], tuple[int, dict]] = {}
    last_calib: dict[str, tuple[int, dict]] = {}
    status_of: dict[int, tuple[int, str]] = {}
    expected_seq, prev_hash, n = 1, GENESIS_HASH, 0
    rows = conn.execute(select(ledger).order_by(ledger.c.seq))
    for row in rows:
        n += 1
        seq = row.seq
        if seq != expected_seq:
            if expected_seq == 1:
                problems.append(f"entries 1..{seq - 1} are missing: the chain starts at seq {seq}")
            else:
                problems.append(f"entries {expected_seq}..{seq - 1} are missing "
                                f"(gap between seq {expected_seq - 1} and {seq})")
        elif row.prev_hash != prev_hash:
            problems.append(f"seq {seq}: prev_hash does not match the hash of seq {seq - 1} "
                            "(an entry was removed or replaced)")
        try:
            delta = json.loads(row.delta)
            witnesses = json.loads(row.witnesses)
            recomputed = entry_hash(row.prev_hash, seq, row.created_at, row.entity, row.action,
                                    delta, witnesses)
        except (ValueError, TypeError) as e:
            problems.append(f"seq {seq}: delta or witnesses is not valid JSON ({e}) (entry edited)")
            delta, recomputed = {}, None
        if recomputed is not None and recomputed != row.hash:
            problems.append(f"seq {seq}: hash mismatch, entry edited "
                            f"({row.entity} {row.action})")
        key = parse_trust_entity(row.entity)
        if key is not None and isinstance(delta, dict) and all(f in delta for f in TRUST_FIELDS):
            last_trust[key] = (seq, delta)
        if row.action == "calibration" and isinstance(delta, dict):
            last_calib[row.entity.partition(":")[2]] = (seq, delta)
        if row.action in STATUS_ACTIONS and isinstance(delta, dict) and key is None:
            vid = row.entity.partition(":")[2]
            if vid.isdigit():
                status_of[int(vid)] = (seq, str(delta.get("to")))
            if isinstance(delta.get("retired"), int):
                status_of[delta["retired"]] = (seq, "retired")
        expected_seq, prev_hash = seq + 1, row.hash

    seen: set[tuple[int, str]] = set()
    for t in conn.execute(select(trust)).mappings():   # mappings: Row.count is tuple.count
        key = (t["model_version_id"], t["context"])
        seen.add(key)
        if key not in last_trust:
            problems.append(f"trust row model_version {key[0]} / {key[1]} has no ledger entries "
                            "(written behind the ledger's back, or its entries were removed)")
            continue
        seq, d = last_trust[key]
        got = {"alpha_after": t["alpha"], "beta_after": t["beta"], "count_after": t["count"]}
        bad = [f"{f[:-6]} {got[f]!r} vs ledger {d[f]!r}" for f in TRUST_FIELDS
               if not isinstance(d[f], (int, float)) or not _close(got[f], d[f])]
        if bad:
            problems.append(f"trust row model_version {key[0]} / {key[1]} differs from its last "
                            f"ledger entry (seq {seq}): {', '.join(bad)} "
                            "(ledger tail removed or trust row edited)")
    for key in sorted(set(last_trust) - seen):
        problems.append(f"trust row model_version {key[0]} / {key[1]} is missing although the "
                        f"ledger has entries for it (last seq {last_trust[key][0]})")

    for c in conn.execute(select(calibration)).mappings():
        entry = last_calib.get(c["identity"])
        if entry is None or entry[1].get("values") != json.loads(c["values"]):
            where = f"seq {entry[0]}" if entry else "no entry"
            problems.append(f"calibration of {c['identity']} differs from its last ledger entry "
                            f"({where}) (ledger tail removed or calibration edited)")

    for m in conn.execute(select(model_versions)).mappings():
        seq_status = status_of.get(m["id"])
        if seq_status is None:
            problems.append(f"model version {m['id']} ({m['tier']} {m['name']}) has no ledger entries")
        elif seq_status[1] != m["status"]:
            problems.append(f"model version {m['id']} ({m['tier']} {m['name']}) is {m['status']} but "
                            f"its ledger (seq {seq_status[0]}) leaves it {seq_status[1]} "
                            "(ledger tail removed or status edited)")
    return VerifyReport(ok=not problems, entries=n, problems=problems)
