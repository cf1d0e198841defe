"""The ledger: append-only, hash-chained records of every trust change, one chain per router instance.

Each router instance (each ``Store`` object: ``Store.instance_id``, a uuid or
``store.instance_id``) appends to its own chain, so routers sharing one database never
wait on one chain head. An entry's ``hash`` is the sha256 (hex) of the canonical JSON of
``{prev_hash, seq, chain, created_at, entity, action, delta, witnesses}`` (sorted keys,
separators ``(",", ":")``, no NaN/inf), where ``seq`` is its position ``chain_seq`` in its
chain (1, 2, 3 ...), ``chain`` the chain's instance id, and ``prev_hash`` the hash of the
chain's previous entry (``"0" * 64`` for its first). The entries written before ledger
chains (migration 10) form the chain ``legacy``: their hash has no ``chain`` key, and their
``chain_seq`` is their ``seq``, so they verify as they always did.

``ledger.seq`` numbers entries across chains (the table's key, ``Store.ledger_entries``'
order): on SQLite 1, 2, 3 ...; on PostgreSQL drawn from the sequence ``ledger_seq_global``
(gaps where a transaction rolled back). It is drawn after the transaction holds its trust
rows' locks, so for each trust row its entries' ``seq`` order is the order the row changed.

``verify`` re-walks every chain and cross-checks them against the tables they are the
history of (trust, model version status, calibration): per trust row (version × context)
the entries of all chains, in ``seq`` order, must link (each entry's before is the previous
one's after) and end at the row's value. So an edited entry, a removed entry (middle or
tail), a lost update (two writers starting from one old value) and a row changed behind the
ledger's back are each reported.

The end of each chain is anchored outside the database for an SQLite file
(:mod:`dreamroute.store.anchor`), so removing trailing entries is detected even when the
tables were rolled back to match them. PostgreSQL and in-memory stores have no anchor.

Writers: ``append_entries`` (inside the caller's transaction; the chain is the one
``Store._write`` names in ``conn.info[CHAIN_KEY]``) and ``trust_entries`` (the
``trust.update`` delta format ``verify`` relies on).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import Connection

from dreamroute.errors import LedgerError, StoreError
from dreamroute.store.schema import (
    GENESIS_HASH, TrustUpdate, calibration, ledger, model_versions, trust,
)

TRUST_ENTITY_PREFIX = "model_version:"
TRUST_FIELDS = ("alpha_after", "beta_after", "count_after")
STATUS_ACTIONS = ("model.activate", "model.candidate", "model.reject", "model.retire")
HEAD_KEY = "dreamroute_ledger_head"   # Connection.info key: (chain, chain_seq, hash) appended by this transaction
CHAIN_KEY = "dreamroute_ledger_chain"  # Connection.info key: the chain (instance id) this transaction appends to
LEGACY_CHAIN = "legacy"                # the chain of the entries written before migration 10
CHAIN_LOCK = 7215                      # pg_advisory_xact_lock(CHAIN_LOCK, hashtext(chain)): one appender per chain


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
               delta: dict, witnesses: list[str], chain: str | None = None) -> str:
    """sha256 hex digest (64 chars) of one entry's canonical JSON, chained to ``prev_hash``;
    ``seq`` is its position in its chain, ``chain`` the chain (None or ``legacy``: not hashed)."""
    payload = {"prev_hash": prev_hash, "seq": seq, "created_at": created_at, "entity": entity,
               "action": action, "delta": delta, "witnesses": list(witnesses)}
    if chain is not None and chain != LEGACY_CHAIN:
        payload["chain"] = chain
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
    """Chain ``(entity, action, delta, witnesses)`` entries onto the chain ``conn.info[CHAIN_KEY]``
    (``legacy`` when unset) inside the caller's write transaction; returns their ``seq``.

    The chain's head is read under its lock: the write lock on SQLite (BEGIN IMMEDIATE), the
    advisory lock ``(CHAIN_LOCK, hashtext(chain))`` on PostgreSQL, where ``seq`` comes from
    the sequence ``ledger_seq_global``. Raises StoreError when a delta is not JSON (NaN, inf,
    an unknown type)."""
    if not entries:
        return []
    chain = conn.info.get(CHAIN_KEY) or LEGACY_CHAIN
    pg = conn.dialect.name == "postgresql"
    if pg:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:c))"), {"k": CHAIN_LOCK, "c": chain})
    last = conn.execute(select(ledger.c.chain_seq, ledger.c.hash).where(ledger.c.instance_id == chain)
                        .order_by(ledger.c.chain_seq.desc()).limit(1)).first()
    cseq, prev = (last.chain_seq, last.hash) if last else (0, GENESIS_HASH)
    if pg:
        seqs = sorted(conn.execute(text("SELECT nextval('ledger_seq_global') FROM generate_series(1, :n)"),
                                   {"n": len(entries)}).scalars())
    else:
        top = conn.execute(select(func.max(ledger.c.seq))).scalar() or 0
        seqs = list(range(top + 1, top + 1 + len(entries)))
    rows = []
    for seq, (entity, action, delta, witnesses) in zip(seqs, entries):
        cseq += 1
        try:
            delta = json.loads(canonical_json(delta))   # numpy -> python, int keys -> str
            witnesses = [str(w) for w in witnesses]
            h = entry_hash(prev, cseq, now, entity, action, delta, witnesses, chain)
        except (TypeError, ValueError) as e:
            raise StoreError(f"ledger entry {entity} {action} is not canonical JSON: {e}") from e
        rows.append({"seq": int(seq), "created_at": now, "entity": entity, "action": action,
                     "delta": canonical_json(delta), "witnesses": canonical_json(witnesses),
                     "prev_hash": prev, "hash": h, "instance_id": chain, "chain_seq": cseq})
        prev = h
    conn.execute(insert(ledger), rows)
    conn.info[HEAD_KEY] = (chain, cseq, prev)   # the chain's new head, for the anchor written after commit
    return [r["seq"] for r in rows]


def _mean(alpha: float, beta: float) -> float | None:
    return alpha / (alpha + beta) if alpha + beta > 0 else None


def trust_entries(updates: list[TrustUpdate], ids: list[int]) -> list[tuple[str, str, dict, list[str]]]:
    """``trust.update`` entries for ``updates``; ``ids`` are the experience ids that
    ``experience_index`` points into. Delta: alpha/beta before and after, count_before (when
    known: every entry since migration 10) and count_after,
    trust_before/after (posterior means), reason, experience_id; and, where the update sets
    a response's verdict, ``reward`` (and ``replaces``: the verdict a correction takes back)."""
    out = []
    for u in updates:
        delta = {"alpha_before": u.alpha_before, "beta_before": u.beta_before,
                 **({"count_before": u.count_before} if u.count_before is not None else {}),
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
    """Result of ``verify``: ``ok`` when ``problems`` is empty; ``entries`` = entries read (all
    chains); ``chains`` = entries per chain (instance id → count)."""

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    chains: dict[str, int] = field(default_factory=dict)

    def raise_if_bad(self) -> None:
        """Raise LedgerError listing the problems (first ten) when the ledger does not verify."""
        if not self.ok:
            more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
            raise LedgerError("the ledger does not verify: " + "; ".join(self.problems[:10]) + more
                              + ". Restore the database from a backup, or start a new --db.")


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-12)


def _walk_chains(conn: Connection, problems: list[str], chains: dict[str, int]):
    """Yield every entry (chain by chain, in chain order) with its decoded delta (``{}`` when
    unreadable), reporting gaps, broken links and edited entries into ``problems``."""
    chain, expected, prev_hash = None, 1, GENESIS_HASH
    for row in conn.execute(select(ledger).order_by(ledger.c.instance_id, ledger.c.chain_seq)):
        if row.instance_id != chain:
            chain, expected, prev_hash = row.instance_id, 1, GENESIS_HASH
        chains[chain] = chains.get(chain, 0) + 1
        cs, where = row.chain_seq, f"chain {row.instance_id}"
        if cs != expected:
            if expected == 1:
                problems.append(f"{where}: entries 1..{cs - 1} are missing: the chain starts at seq {cs}")
            else:
                problems.append(f"{where}: entries {expected}..{cs - 1} are missing "
                                f"(gap between seq {expected - 1} and {cs})")
        elif row.prev_hash != prev_hash:
            problems.append(f"seq {row.seq} ({where} #{cs}): prev_hash does not match the hash of the entry "
                            "before it (an entry was removed or replaced)")
        try:
            delta = json.loads(row.delta)
            witnesses = json.loads(row.witnesses)
            recomputed = entry_hash(row.prev_hash, cs, row.created_at, row.entity, row.action, delta,
                                    witnesses, row.instance_id)
        except (ValueError, TypeError) as e:
            problems.append(f"seq {row.seq} ({where} #{cs}): delta or witnesses is not valid JSON ({e}) "
                            "(entry edited)")
            delta, recomputed = {}, None
        if recomputed is not None and recomputed != row.hash:
            problems.append(f"seq {row.seq} ({where} #{cs}): hash mismatch, entry edited "
                            f"({row.entity} {row.action})")
        expected, prev_hash = cs + 1, row.hash
        yield row, delta if isinstance(delta, dict) else {}


def _link_problems(history: list[tuple[int, str, dict]], key: tuple[int, str]) -> list[str]:
    """Entries of one trust row from every chain, in seq order: each must start where the one
    before it ended (alpha, beta, and count where both entries say it)."""
    out = []
    for (s0, c0, d0), (s1, c1, d1) in zip(history, history[1:]):
        pairs = [("alpha", "alpha_before", "alpha_after"), ("beta", "beta_before", "beta_after"),
                 ("count", "count_before", "count_after")]
        bad = [f"{n} {d1[b]!r} vs {d0[a]!r}" for n, b, a in pairs
               if b in d1 and a in d0 and isinstance(d1[b], (int, float)) and isinstance(d0[a], (int, float))
               and not _close(d1[b], d0[a])]
        if bad:
            out.append(f"trust row model_version {key[0]} / {key[1]}: seq {s1} (chain {c1}) starts from "
                       f"another value than seq {s0} (chain {c0}) left it: {', '.join(bad)} (a lost update: "
                       "two writers changed the row from one old value; or an entry between them was removed)")
    return out


def verify(conn: Connection) -> VerifyReport:
    """Walk every chain and cross-check them all; never raises for a broken ledger.

    Checks, each reported as one line in ``problems``:
      * in each chain, chain_seq runs 1, 2, 3 ... (a gap means entries were removed);
      * each prev_hash equals the hash of the chain's previous entry;
      * each hash matches its recomputed value (an edited entry);
      * for each (model_version, context), its ``trust.update`` entries of all chains in
        ``seq`` order link: each one's alpha/beta (and count) before equal the previous
        one's after (a lost update, or an entry removed in between);
      * for each (model_version, context) the last entry (highest ``seq``, any chain) with
        ``alpha_after``, ``beta_after`` and ``count_after`` equals the trust row (a removed
        tail or a trust row edited directly), and every trust row has entries;
      * likewise each calibration row equals its last ``calibration`` entry,
        and each model version's status the one its ``model.*`` entries
        (``to``, and ``retired`` for the version an activation retired) leave.
    An entry of another action at the very end of a chain has no table to
    be checked against, and a removed tail whose tables were rolled back to
    match leaves a valid shorter chain: neither shows here, only against the
    anchor (:mod:`dreamroute.store.anchor`, checked by ``Store.verify_ledger``).
    """
    problems: list[str] = []
    chains: dict[str, int] = {}
    trust_hist: dict[tuple[int, str], list[tuple[int, str, dict]]] = {}
    last_calib: dict[str, tuple[int, dict]] = {}
    status_events: list[tuple[int, int, str]] = []   # (seq, version id, status it leaves)
    n = 0
    for row, delta in _walk_chains(conn, problems, chains):
        n += 1
        seq = row.seq
        key = parse_trust_entity(row.entity)
        if key is not None and all(f in delta for f in TRUST_FIELDS):
            trust_hist.setdefault(key, []).append((seq, row.instance_id, delta))
        if row.action == "calibration" and (row.entity.partition(":")[2] not in last_calib
                                            or last_calib[row.entity.partition(":")[2]][0] < seq):
            last_calib[row.entity.partition(":")[2]] = (seq, delta)
        if row.action in STATUS_ACTIONS and key is None:
            vid = row.entity.partition(":")[2]
            if vid.isdigit():
                status_events.append((seq, int(vid), str(delta.get("to"))))
            if isinstance(delta.get("retired"), int):
                status_events.append((seq, delta["retired"], "retired"))
    last_trust: dict[tuple[int, str], tuple[int, dict]] = {}
    for key in sorted(trust_hist):
        hist = sorted(trust_hist[key], key=lambda e: e[0])
        problems.extend(_link_problems(hist, key))
        last_trust[key] = (hist[-1][0], hist[-1][2])
    status_of: dict[int, tuple[int, str]] = {}
    for seq, vid, status in sorted(status_events, key=lambda e: e[0]):
        status_of[vid] = (seq, status)

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
    return VerifyReport(ok=not problems, entries=n, problems=problems, chains=chains)
