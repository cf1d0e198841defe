"""Reading what other routers stored: experiences since an id, and a cursor that misses none.

Routers sharing one store (PostgreSQL, or one SQLite file) each tag their experiences with
their ``instance_id`` (migration 10). A router keeps its in-memory index current by reading
the experiences other instances stored since it last looked (``Store.experiences_since``;
:mod:`dreamroute.router.sync` adds them to memory).

Ids are not handed out in commit order on PostgreSQL: a transaction that took id 100 may
commit after one that took 101. A reader that only remembered "everything up to 101" would
miss 100 for good. :class:`SyncCursor` therefore keeps the ids below the highest one it has
seen that were missing when it looked (gaps) and looks for them again on each poll, for
``gap_timeout_s`` (a gap that old is a rolled-back transaction, whose id never appears).
"""

from __future__ import annotations

import time

from sqlalchemy import or_, select

from dreamroute.store import schema as T

#: the longest run of missing ids a cursor waits for (longer: ids skipped, e.g. a restored sequence)
MAX_GAP = 1000

#: what :mod:`dreamroute.router.sync` needs of each experience
SYNC_COLUMNS = ("id", "instance_id", "request_id", "role", "conversation_id", "prompt", "tier", "model_version_id",
                "response", "prompt_tokens", "completion_tokens", "atp_joules", "confidence", "context",
                "surprise", "surprise_tier", "outcome", "witness", "predicted", "mean_logprob", "messages_hash",
                "finish_reason")


def experiences_since(store, last_id: int, *, exclude_instance: str | None = None,
                      columns: list[str] | tuple[str, ...] | None = None, limit: int | None = None,
                      ids: list[int] | None = None) -> list[dict]:
    """Experiences with id > ``last_id`` (or, with ``ids``, those ids), in id order, as dicts of
    ``columns`` (default :data:`SYNC_COLUMNS`). ``exclude_instance`` leaves out the rows that
    instance stored (rows from before migration 10, instance NULL, are kept); ``limit`` caps
    the rows. Raises StoreError on a failed read or an unknown column."""
    from dreamroute.errors import StoreError

    cols = list(columns or SYNC_COLUMNS)
    bad = [c for c in cols if c not in T.experiences.c]
    if bad:
        raise StoreError(f"unknown experience columns {bad}")
    e = T.experiences.c
    stmt = select(*[e[c] for c in cols]).order_by(e.id)
    stmt = stmt.where(e.id.in_(ids)) if ids is not None else stmt.where(e.id > int(last_id))
    if exclude_instance is not None:
        stmt = stmt.where(or_(e.instance_id.is_(None), e.instance_id != exclude_instance))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    with store._read() as conn:
        return [dict(zip(cols, r)) for r in conn.execute(stmt)]


class SyncCursor:
    """Where one router is in reading the experiences other instances store.

    Args:
        store: the shared Store.
        instance_id: this router's instance (its own rows are skipped).
        last_id: the highest id already known (e.g. what memory was loaded from).
        gap_timeout_s: how long a missing id below the highest seen is looked for again, s.
        batch: the most rows one :meth:`poll` reads.

    Not thread-safe: one poller per cursor.
    """

    def __init__(self, store, instance_id: str, last_id: int = 0, *, gap_timeout_s: float = 60.0,
                 batch: int = 5000):
        self.store, self.instance_id = store, instance_id
        self.last_id = int(last_id)
        self.gap_timeout_s, self.batch = gap_timeout_s, batch
        self.gaps: dict[int, float] = {}   # missing id → monotonic time it was first missed

    def poll(self, columns: list[str] | tuple[str, ...] | None = None) -> list[dict]:
        """Other instances' experiences not returned before (new ones, and late commits that
        fill a gap), in id order, as dicts of ``columns`` (default :data:`SYNC_COLUMNS`; ``id``
        and ``instance_id`` always included). Raises StoreError on a failed read."""
        now = time.monotonic()
        self.gaps = {i: t for i, t in self.gaps.items() if now - t < self.gap_timeout_s}
        heads = experiences_since(self.store, self.last_id, columns=["id", "instance_id"], limit=self.batch)
        late = experiences_since(self.store, 0, columns=["id", "instance_id"], ids=sorted(self.gaps)) \
            if self.gaps else []
        want: list[int] = []
        for r in late:
            self.gaps.pop(r["id"], None)
            if r["instance_id"] != self.instance_id:
                want.append(r["id"])
        prev = self.last_id
        for r in heads:
            if r["id"] - prev - 1 <= MAX_GAP:       # a longer run of missing ids is not waited for
                for missing in range(prev + 1, r["id"]):
                    self.gaps.setdefault(missing, now)
            prev = r["id"]
            if r["instance_id"] != self.instance_id:
                want.append(r["id"])
        self.last_id = max(self.last_id, prev)
        if not want:
            return []
        cols = list(dict.fromkeys(["id", "instance_id", *(columns or SYNC_COLUMNS)]))
        return experiences_since(self.store, 0, columns=cols, ids=sorted(want))
