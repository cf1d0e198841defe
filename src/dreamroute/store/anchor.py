"""The ledger's anchor: the head of each hash chain, kept outside the database.

The chains (:mod:`dreamroute.store.ledger`, one per router instance) show an edited or
removed entry in their middle, and ``verify`` cross-checks the tables the ledger is the
history of. What neither can show is a removed *tail* whose tables were rolled back to
match: delete the last k entries of a chain, set every trust row (calibration, model
status) to what the remaining entries leave, and what is left is a valid, shorter chain.
Anything kept inside the same database is rolled back with it: a trust row carrying the
hash of its last entry is rolled back together with the row. So the heads are kept outside it.

The anchor of SQLite file ``F`` is the file ``F.ledger-head`` next to it (one per
database, so several stores, one per ``--db``, each have their own), JSON holding the head
of every chain (the set):

    {"format": 2, "chains": {"<instance id>": {"seq": N, "hash": "<hash of entry N>",
     "first": "<hash of entry 1>", "written_at": "<UTC ISO time>"}, ...}, "written_at": "..."}

(``seq`` is the position in the chain, ``chain_seq``.) A format-1 file (one chain, written
before ledger chains: ``{"format": 1, "seq", "hash", "first", "written_at"}``) is read as
the anchor of the chain ``legacy``, which is what its entries became at migration 10.

Written after every commit that appended entries: the store's own chain's head is merged
into the file under an advisory file lock (``F.ledger-head.lock``: several processes writing
one SQLite file each move only their own chain on, and a chain's anchor never moves back),
as a temporary file renamed over the old one (whole or not at all). Commits closer together
than ``INTERVAL_S`` (a bulk run) are written together, at most ``INTERVAL_S`` later (a
timer), and on ``Store.close``. ``verify`` then requires, for each anchored chain, that the
chain still holds entry N with that hash (so it is at least N long) and entry 1 with ``first``.

Crash consistency: the anchor is written after the commit, and a commit is on disk
before it returns (``synchronous = FULL``), so the database can be ahead of its anchor
(a crash between the two: the next commit or open moves it on) but never behind it. A
database restored from an older backup is behind its anchor and fails verification, by
design: it has lost entries; when that was deliberate, delete the anchor file and the next
open anchors the restored chains.

Opening a store anchors it: a new database file gets a fresh anchor (replacing one a
deleted database left behind); the chains of a database that the anchor lacks or has
behind (from before anchoring, or its anchor deleted or unreadable, or a crash before the
anchor write) are anchored at their current heads. A database that is behind its anchor at
open leaves the anchor as it is (the evidence is kept; no write moves it) until the file is
deleted. Limits: whoever can rewrite the database *and* this file can still cut a tail;
copy the anchor elsewhere (or compare ``dreamroute ledger show`` heads) to guard against
that. In-memory stores and database URLs (PostgreSQL) have no anchor: there a removed tail
with the tables rolled back to match is not detected (keep the server's own backups and
WAL archive for that).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from dreamroute.store.ledger import HEAD_KEY, LEGACY_CHAIN, VerifyReport
from dreamroute.store.schema import GENESIS_HASH, ledger, utc_now

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one process per SQLite file then
    fcntl = None

SUFFIX = ".ledger-head"
FORMAT = 2          # 1: the single chain of a store from before ledger chains (read as "legacy")
INTERVAL_S = 0.05   # the least time between two anchor writes of one store (s)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchor:
    """One chain's anchor: the chain held ``seq`` entries, the last with ``hash``, the first
    ``first`` (None for an empty chain); ``written_at`` is a UTC ISO time."""

    seq: int
    hash: str
    first: str | None
    written_at: str = ""


def anchor_path(db: Path) -> Path:
    """Where the anchor of SQLite file ``db`` lives: ``<db>.ledger-head`` beside it."""
    return db.with_name(db.name + SUFFIX)


def _anchor(d: dict) -> Anchor:
    a = Anchor(int(d["seq"]), str(d["hash"]), d.get("first"), str(d.get("written_at", "")))
    if a.seq < 0:
        raise ValueError("negative seq")
    return a


def read_anchors(path: Path) -> dict[str, Anchor] | None:
    """Every chain's anchor in ``path`` (chain → Anchor; a format-1 file is the chain ``legacy``);
    None when the file is missing or unreadable (never raises)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("format") == 1:
            return {LEGACY_CHAIN: _anchor(d)}
        if d.get("format") != FORMAT or not isinstance(d.get("chains"), dict):
            return None
        return {str(c): _anchor(a) for c, a in d["chains"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_anchor(path: Path, chain: str | None = None) -> Anchor | None:
    """One chain's anchor in ``path``: ``chain``'s, or with None the file's only one (an empty
    ``Anchor(0, GENESIS_HASH, None, written_at)`` when it anchors no chain; None when it holds
    several: name the chain). None when missing or unreadable."""
    anchors = read_anchors(path)
    if anchors is None:
        return None
    if chain is not None:
        return anchors.get(chain)
    if not anchors:
        try:
            written = str(json.loads(path.read_text(encoding="utf-8")).get("written_at", ""))
        except (OSError, ValueError, AttributeError):
            written = ""
        return Anchor(0, GENESIS_HASH, None, written)
    return next(iter(anchors.values())) if len(anchors) == 1 else None


def write_anchors(path: Path, anchors: dict[str, Anchor]) -> None:
    """Replace ``path`` with ``anchors`` atomically (temporary file, then rename). Raises OSError."""
    now = utc_now()
    body = json.dumps({"format": FORMAT, "written_at": now, "chains": {
        c: {"seq": a.seq, "hash": a.hash, "first": a.first, "written_at": a.written_at or now}
        for c, a in sorted(anchors.items())}}, sort_keys=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_anchor(path: Path, anchor: Anchor, chain: str = LEGACY_CHAIN) -> None:
    """Replace ``path`` with the anchor of one chain only (see :func:`write_anchors`)."""
    write_anchors(path, {chain: anchor})


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``<anchor>.lock`` (processes merging into one anchor)."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def chain_head(conn: Connection, chain: str) -> Anchor:
    """One chain's head now: (last chain_seq, its hash, the first entry's hash); seq 0 when empty."""
    c = ledger.c
    last = conn.execute(select(c.chain_seq, c.hash).where(c.instance_id == chain)
                        .order_by(c.chain_seq.desc()).limit(1)).first()
    if last is None:
        return Anchor(0, GENESIS_HASH, None)
    first = conn.execute(select(c.hash).where(c.instance_id == chain)
                         .order_by(c.chain_seq).limit(1)).scalar()
    return Anchor(last.chain_seq, last.hash, first)


def chain_heads(conn: Connection) -> dict[str, Anchor]:
    """Every chain's head now (chain → Anchor)."""
    chains = conn.execute(select(ledger.c.instance_id).distinct()).scalars().all()
    return {ch: chain_head(conn, ch) for ch in chains}


def anchor_problems(conn: Connection, chain: str, anchor: Anchor, path: Path) -> list[str]:
    """What in ``chain`` contradicts its ``anchor`` (one line each; [] when it holds).

    The chain must hold entry ``anchor.seq`` with ``anchor.hash`` (it may go on past it)
    and its first entry must be ``anchor.first``.
    """
    if anchor.seq == 0:
        return []
    fix = (f"restore the database from a backup; if it was restored from an older one on purpose, "
           f"delete {path} to anchor it anew")
    c, where = ledger.c, f"chain {chain}: "
    out = []
    top = conn.execute(select(func.max(c.chain_seq)).where(c.instance_id == chain)).scalar() or 0
    at = conn.execute(select(c.hash).where(c.instance_id == chain, c.chain_seq == anchor.seq)).scalar()
    if top == 0:
        return [f"{where}its anchor {path} records {anchor.seq} entries (head {anchor.hash[:16]}…, written "
                f"{anchor.written_at}), but the ledger holds none of them: the chain was removed, or the "
                f"database replaced by another; {fix}"]
    if top < anchor.seq:
        out.append(f"{where}the ledger ends at seq {top}, but its anchor {path} records {anchor.seq} entries "
                   f"(head {anchor.hash[:16]}…, written {anchor.written_at}): entries {top + 1}..{anchor.seq} "
                   f"were removed from its end (with the tables rolled back to match, only the anchor shows it); "
                   f"{fix}")
    elif at is None:
        out.append(f"{where}seq {anchor.seq}, the head anchored in {path}, is missing from the chain; {fix}")
    elif at != anchor.hash:
        out.append(f"{where}seq {anchor.seq} differs from the head anchored in {path} (hash {at[:16]}… vs "
                   f"{anchor.hash[:16]}…): the chain was rewritten at or before it; {fix}")
    first = conn.execute(select(c.hash).where(c.instance_id == chain, c.chain_seq == 1)).scalar()
    if anchor.first and first is not None and first != anchor.first:
        out.append(f"{where}the ledger's first entry differs from the one anchored in {path}: this is not "
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
        self._first: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._pending: dict[str, Anchor] = {}
        self._timer: threading.Timer | None = None
        self._last = 0.0
        with engine.connect() as conn:
            heads = chain_heads(conn)
            current = None if fresh else read_anchors(self.path)
            if current and any(anchor_problems(conn, ch, a, self.path) for ch, a in current.items()):
                self.frozen = True
                log.warning("the ledger of %s is behind or off its anchor %s; run `dreamroute ledger verify`",
                            db, self.path)
                return
        self._first = {ch: h.first for ch, h in heads.items()}
        if current is None or any(ch not in current or current[ch].seq < h.seq for ch, h in heads.items()):
            with self._lock:
                self._write(heads, replace=current is None)

    def staged(self, conn: Connection) -> tuple[str, Anchor] | None:
        """Inside a write transaction, just before it commits: (chain, the head it appended), or None."""
        head = conn.info.pop(HEAD_KEY, None)
        if head is None or self.frozen:
            return None
        chain, seq, h = head
        if self._first.get(chain) is None:
            c = ledger.c
            self._first[chain] = conn.execute(select(c.hash).where(c.instance_id == chain,
                                                                    c.chain_seq == 1)).scalar()
        return chain, Anchor(seq, h, self._first[chain])

    def committed(self, head: tuple[str, Anchor]) -> None:
        """After the commit: write ``head`` (chain, Anchor) into the anchor now, or, within
        ``INTERVAL_S`` of the last write, with the next one (a timer) or :meth:`flush`. Never
        raises: a failed write is kept in ``error`` and logged (the database is then ahead of
        its anchor, which verifies)."""
        chain, a = head
        with self._lock:
            if chain not in self._pending or a.seq > self._pending[chain].seq:
                self._pending[chain] = a
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
        if self._pending:
            heads, self._pending = self._pending, {}
            self._write(heads)

    def _write(self, heads: dict[str, Anchor], *, replace: bool = False) -> None:
        """Merge ``heads`` into the file (each chain only moves forward), or with ``replace``
        write exactly them; under the file lock."""
        self._last = time.monotonic()
        now = utc_now()
        try:
            with _file_lock(self.path):
                merged = {} if replace else dict(read_anchors(self.path) or {})
                for ch, a in heads.items():
                    if ch not in merged or a.seq > merged[ch].seq:
                        merged[ch] = Anchor(a.seq, a.hash, a.first, now)
                write_anchors(self.path, merged)
            self.error = None
        except OSError as e:
            self.error = f"cannot write the ledger anchor {self.path}: {e}"
            log.warning("%s", self.error)

    def check(self, conn: Connection, report: VerifyReport) -> VerifyReport:
        """``report`` with the anchor's problems added (the file is read again, not cached)."""
        current = read_anchors(self.path) or {}
        problems = list(report.problems)
        for ch, a in sorted(current.items()):
            problems.extend(anchor_problems(conn, ch, a, self.path))
        return VerifyReport(ok=not problems, entries=report.entries, problems=problems, chains=report.chains)
