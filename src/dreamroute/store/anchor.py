"""The ledger's anchor: the head of the hash chain, kept outside the database.

The chain (:mod:`dreamroute.store.ledger`) shows an edited or removed entry in its
middle, and ``verify`` cross-checks the tables the ledger is the history of. What
neither can show is a removed *tail* whose tables were rolled back to match: delete
the last k entries, set every trust row (calibration, model status) to what the
remaining entries leave, and what is left is a valid, shorter chain. Anything kept
inside the same database is rolled back with it: a trust row carrying the hash of its
last entry is rolled back together with the row. So the head is kept outside it.

The anchor of SQLite file ``F`` is the file ``F.ledger-head`` next to it (one per
database, so several stores, one per ``--db``, each have their own), JSON:

    {"format": 1, "seq": N, "hash": "<hash of entry N>", "first": "<hash of entry 1>",
     "written_at": "<UTC ISO time>"}

Written after every commit that appended entries (a temporary file renamed over the
old one: whole or not at all); commits closer together than ``INTERVAL_S`` (a bulk run)
are written together, at most ``INTERVAL_S`` later (a timer), and on ``Store.close``. ``verify`` then requires that the chain still holds
entry N with that hash (so it is at least N long) and entry 1 with ``first``.

Crash consistency: the anchor is written after the commit, and a commit is on disk
before it returns (``synchronous = FULL``), so the database can be ahead of its anchor
(a crash between the two, or two processes writing the anchor out of order: the next
commit moves it on) but never behind it. A database restored from an older backup is
behind its anchor and fails verification, by design: it has lost entries; when that
was deliberate, delete the anchor file and the next open anchors the restored chain.

Opening a store anchors it: a new database file gets a fresh anchor (replacing one a
deleted database left behind); a database without an anchor (from before anchoring,
or its anchor deleted, or unreadable) is anchored at its current head. A database
that is behind its anchor at open leaves the anchor as it is (the evidence is kept;
no write moves it) until the file is deleted. Limits: whoever can rewrite the
database *and* this file can still cut the tail; copy the anchor elsewhere (or
compare ``dreamroute ledger show`` heads) to guard against that. In-memory stores and
database URLs (PostgreSQL) are not anchored.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from dreamroute.store.ledger import HEAD_KEY, VerifyReport
from dreamroute.store.schema import GENESIS_HASH, ledger, utc_now

SUFFIX = ".ledger-head"
FORMAT = 1
INTERVAL_S = 0.05   # the least time between two anchor writes of one store (s)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchor:
    """One anchor: the chain held ``seq`` entries, the last with ``hash``, the first ``first``
    (None for an empty chain); ``written_at`` is a UTC ISO time."""

    seq: int
    hash: str
    first: str | None
    written_at: str = ""


def anchor_path(db: Path) -> Path:
    """Where the anchor of SQLite file ``db`` lives: ``<db>.ledger-head`` beside it."""
    return db.with_name(db.name + SUFFIX)


def read_anchor(path: Path) -> Anchor | None:
    """The anchor in ``path``; None when the file is missing or unreadable (never raises)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("format") != FORMAT:
            return None
        a = Anchor(int(d["seq"]), str(d["hash"]), d.get("first"), str(d.get("written_at", "")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return a if a.seq >= 0 else None


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Replace ``path`` with ``anchor`` atomically (temporary file, then rename). Raises OSError."""
    body = json.dumps({"format": FORMAT, "seq": anchor.seq, "hash": anchor.hash, "first": anchor.first,
                       "written_at": anchor.written_at or utc_now()}, sort_keys=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def chain_head(conn: Connection) -> Anchor:
    """The chain's head now: (last seq, its hash, the first entry's hash); seq 0 when empty."""
    last = conn.execute(select(ledger.c.seq, ledger.c.hash).order_by(ledger.c.seq.desc()).limit(1)).first()
    if last is None:
        return Anchor(0, GENESIS_HASH, None)
    first = conn.execute(select(ledger.c.hash).order_by(ledger.c.seq).limit(1)).scalar()
    return Anchor(last.seq, last.hash, first)


def anchor_problems(conn: Connection, anchor: Anchor, path: Path) -> list[str]:
    """What in the chain contradicts ``anchor`` (one line each; [] when it holds).

    The chain must hold entry ``anchor.seq`` with ``anchor.hash`` (it may go on past it)
    and its first entry must be ``anchor.first``.
    """
    if anchor.seq == 0:
        return []
    fix = (f"restore the database from a backup; if it was restored from an older one on purpose, "
           f"delete {path} to anchor it anew")
    out = []
    top = conn.execute(select(func.max(ledger.c.seq))).scalar() or 0
    at = conn.execute(select(ledger.c.hash).where(ledger.c.seq == anchor.seq)).scalar()
    if top < anchor.seq:
        out.append(f"the ledger ends at seq {top}, but its anchor {path} records {anchor.seq} entries "
                   f"(head {anchor.hash[:16]}…, written {anchor.written_at}): entries {top + 1}..{anchor.seq} "
                   f"were removed from its end (with the tables rolled back to match, only the anchor shows it); "
                   f"{fix}")
    elif at is None:
        out.append(f"seq {anchor.seq}, the head anchored in {path}, is missing from the chain; {fix}")
    elif at != anchor.hash:
        out.append(f"seq {anchor.seq} differs from the head anchored in {path} (hash {at[:16]}… vs "
                   f"{anchor.hash[:16]}…): the chain was rewritten at or before it; {fix}")
    first = conn.execute(select(ledger.c.hash).where(ledger.c.seq == 1)).scalar()
    if anchor.first and first is not None and first != anchor.first:
        out.append(f"the ledger's first entry differs from the one anchored in {path}: this is not "
                   f"the chain that was anchored (replaced or rewritten from the start); {fix}")
    return out


class LedgerAnchor:
    """Keeps the anchor of one store's SQLite file current (see the module docstring).

    Args:
        db: the SQLite file.
        engine: the store's engine (read at open).
        fresh: the file was created by this open (an anchor left by a deleted database is replaced).

    Attributes:
        path: the anchor file.
        frozen: the database was behind its anchor at open; the anchor is not written.
        error: the last failure to write it (None if none); a write failure never fails a commit.
    """

    def __init__(self, db: Path, engine: Engine, *, fresh: bool):
        self.path = anchor_path(db)
        self.frozen = False
        self.error: str | None = None
        self._first: str | None = None
        self._lock = threading.Lock()
        self._pending: Anchor | None = None
        self._timer: threading.Timer | None = None
        self._last = 0.0
        with engine.connect() as conn:
            head = chain_head(conn)
            current = None if fresh else read_anchor(self.path)
            if current is not None and anchor_problems(conn, current, self.path):
                self.frozen = True
                log.warning("the ledger of %s is behind or off its anchor %s; run `dreamroute ledger verify`",
                            db, self.path)
                return
        self._first = head.first
        if current is None or current.seq < head.seq:
            with self._lock:
                self._write(head)

    def staged(self, conn: Connection) -> Anchor | None:
        """Inside a write transaction, just before it commits: the head it appended, or None."""
        head = conn.info.pop(HEAD_KEY, None)
        if head is None or self.frozen:
            return None
        if self._first is None:
            self._first = conn.execute(select(ledger.c.hash).where(ledger.c.seq == 1)).scalar()
        return Anchor(head[0], head[1], self._first)

    def committed(self, head: Anchor) -> None:
        """After the commit: write ``head`` as the anchor now, or, within ``INTERVAL_S`` of the
        last write, with the next one (a timer) or :meth:`flush`. Never raises: a failed write
        is kept in ``error`` and logged (the database is then ahead of its anchor, which verifies)."""
        with self._lock:
            if self._pending is None or head.seq > self._pending.seq:
                self._pending = head
            wait = self._last + INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._write_pending()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write the anchor of the last commit if it is not written yet (``Store.close`` does)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending is not None:
            head, self._pending = self._pending, None
            self._write(head)

    def _write(self, head: Anchor) -> None:
        self._last = time.monotonic()
        try:
            write_anchor(self.path, Anchor(head.seq, head.hash, head.first, utc_now()))
            self.error = None
        except OSError as e:
            self.error = f"cannot write the ledger anchor {self.path}: {e}"
            log.warning("%s", self.error)

    def check(self, conn: Connection, report: VerifyReport) -> VerifyReport:
        """``report`` with the anchor's problems added (the file is read again, not cached)."""
        current = read_anchor(self.path)
        problems = list(report.problems) + (anchor_problems(conn, current, self.path) if current else [])
        return VerifyReport(ok=not problems, entries=report.entries, problems=problems)
