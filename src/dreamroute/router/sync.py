"""Learning from other routers: what they store is added to this router's memory.

Several routers sharing one store (PostgreSQL, or one SQLite file) each learn online from
their own requests. :class:`StoreSync` makes each one's in-memory learned state follow the
others' within about ``store.sync_interval_s`` (1 s): every poll it reads the experiences
other instances stored since the last one (:class:`~dreamroute.store.sync.SyncCursor`, which
also catches late commits) and adds them as :meth:`Engine._remember` adds one of its own
(:func:`absorb`: the index row, the direct trust, tier stats, the confidence calibration,
the answer judges, surprise statistics, the conversation's last tier and the fast-path
cache), then rereads the trust rows of the served versions from the store (where every
router's increments are summed atomically). Rows of versions this router does not serve
are skipped, as ``Memory.load`` skips them.

Verdicts given later (feedback, on either router) reach the other routers too: each poll also
rereads the stored outcome of the most recent :data:`WATCH_ROWS` rows this memory holds as
unknown (its own and absorbed ones) and, for each that has a verdict now, sets that row's
outcome in the index and offers it to the fast path (:func:`apply_verdicts`, what
``feedback_update`` does locally); trust itself is reread whole. A verdict that *changes* a
known outcome (a replaced verdict) reaches the other routers' trust, not their index row. The
budget pacer stays per router (each paces its own spending).

Memory is changed under ``engine.state`` when the engine has it (a lock guarding learned
state), so a poll never interleaves with a request's learning.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np

from ..router.judge import answer_features
from ..store.sync import SyncCursor, experiences_since
from ..signals.trust import TrustState
from .memory import OUTCOME_VALUE, Memory

log = logging.getLogger(__name__)

#: ids below the highest already in memory that the first poll reads again (late commits at load)
START_WINDOW = 1000

#: the most recent rows held as unknown whose stored verdict each poll rereads
WATCH_ROWS = 5000


def unknown_rows(memory: Memory, limit: int = WATCH_ROWS) -> list[int]:
    """Ids of the (at most ``limit``) most recent experiences ``memory`` holds with an unknown
    outcome (NaN in the index), ascending."""
    index = memory.index
    ids = index.ids[np.isnan(index.outcome) & (index.ids >= 0)]   # rows without an experience id carry -1
    return sorted(int(i) for i in np.sort(ids)[-limit:]) if len(ids) else []


def apply_verdicts(memory: Memory, rows: list[dict], responses=None) -> int:
    """Set the index outcome of each row of ``rows`` (experience dicts with ``SYNC_COLUMNS``) that
    ``memory`` holds as unknown and the store now holds as success or failure, and offer it to
    the fast-path ``responses`` cache; returns how many changed."""
    outcome, changed = memory.index.outcome, 0
    for r in rows:
        row = memory.exp_rows.get(r["id"])
        if row is None or r["outcome"] not in OUTCOME_VALUE or not math.isnan(outcome[row]):
            continue
        memory.index.set_outcome(row, OUTCOME_VALUE[r["outcome"]])
        if responses is not None:
            responses.observe_row(r)
        changed += 1
    return changed


def absorb(memory: Memory, rows: list[dict], responses=None, vecs=None) -> int:
    """Add other routers' experiences (dicts with ``store.sync.SYNC_COLUMNS``, in id order) to
    ``memory`` (and the fast-path ``responses`` cache, if given), as ``Memory.load`` would have
    had they been stored before it ran. ``vecs``: the rows' prompt vectors ((n, dim), encoded
    beforehand, e.g. outside a lock; default: encoded here). Rows already in memory
    (``memory.exp_rows``) and rows of versions it does not serve are skipped. Returns the
    number of rows added."""
    by_version = {v: t for t, v in memory.versions.items()}
    keep = [i for i, r in enumerate(rows) if r["id"] not in memory.exp_rows and r["model_version_id"] in by_version]
    if not keep:
        return 0
    vecs = memory.encoder.encode_many([rows[i]["prompt"] for i in keep]) if vecs is None else vecs[keep]
    rows = [rows[i] for i in keep]
    fit: set[int] = set()
    prev = None   # (request id, tier index, answer features) of the row before
    for r, vec in zip(rows, vecs):
        tier = by_version[r["model_version_id"]]
        ti = memory.tier_index[tier]
        value = OUTCOME_VALUE.get(r["outcome"], math.nan)
        known = r["outcome"] in OUTCOME_VALUE
        atp = r["atp_joules"] or 0.0
        memory.exp_rows[r["id"]] = memory.index.add(vec, ti, value, atp, r["id"], direct=r["role"] != "escalated")
        if r["role"] != "escalated" and known:
            memory.direct_trust.observe(r["model_version_id"], r["context"], value)
        memory.tier_stats[tier].add(len(r["prompt"]), r["prompt_tokens"] or 0, atp)
        if r["role"] != "audit" and known:
            memory.calibration.add(ti, r["confidence"], value)
        feats = None
        if r["response"]:
            feats = answer_features(r["prompt"], r["response"], r["predicted"], r["confidence"], r["mean_logprob"])
            if known:
                memory.judge.add(ti, feats, value, refit=False)
                fit.add(ti)
        if (prev is not None and prev[0] == r["request_id"] and prev[1] + 1 == ti and prev[2] is not None
                and known):
            memory.next_judge.add(prev[1], prev[2], value, refit=False)
            fit.add(prev[1])
        prev = (r["request_id"], ti, feats)
        if r["surprise"] is not None:
            scorer = r["surprise_tier"] or memory.tiers[0]
            if scorer in memory.surprise:
                memory.surprise[scorer].add(r["surprise"])
        if r["conversation_id"] and r["role"] != "audit":
            memory.serving[r["conversation_id"]] = tier
            memory.conversations[r["conversation_id"]] = vec
        if responses is not None and r["outcome"] in OUTCOME_VALUE:
            responses.observe_row(r)
    for ti in fit:
        memory.judge.fit(ti)
        memory.next_judge.fit(ti)
    return len(rows)


def reread_trust(memory: Memory, store) -> int:
    """Set ``memory.trust`` of the served versions to the store's trust rows (every router's
    updates summed there); returns how many (version, context) posteriors changed."""
    served = set(memory.versions.values())
    changed = 0
    for row in store.trust_table():
        if row.model_version_id not in served:
            continue
        cur = memory.trust.get(row.model_version_id, row.context)
        if (cur.alpha, cur.beta, cur.count) != (row.alpha, row.beta, row.count) \
                or not memory.trust.known(row.model_version_id, row.context):
            memory.trust.set(row.model_version_id, row.context, TrustState(row.alpha, row.beta, row.count))
            changed += 1
    return changed


class StoreSync:
    """Keeps one router's (a :class:`~dreamroute.api.DreamRoute`'s) memory current with what
    the other routers sharing its store record.

    Args:
        dr: the router (its ``store``, ``engine``, ``memory`` and ``responses`` are used as they
            are at each poll: ``refresh_versions`` may replace the memory).
        interval_s: seconds between two polls of the background thread (:meth:`start`).

    Attributes:
        absorbed: experiences added so far; verdicts: unknown outcomes set from the store since;
            polls: polls done; error: the last poll's failure
            (None after a good one; a failed poll is logged and retried at the next interval).
    """

    def __init__(self, dr, interval_s: float = 1.0):
        self.dr, self.interval_s = dr, float(interval_s)
        known = max(dr.memory.exp_rows, default=0)
        self.cursor = SyncCursor(dr.store, dr.store.instance_id, max(0, known - START_WINDOW))
        self.absorbed = self.verdicts = self.polls = 0
        self.error: str | None = None
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        """One sync: read, then add under the engine's state lock. Returns experiences added.
        Raises StoreError on a failed read (the background thread logs it and goes on)."""
        with self._poll_lock:
            rows = self.cursor.poll()
            served = set(self.dr.memory.versions.values())
            rows = [r for r in rows if r["model_version_id"] in served]
            vecs = self.dr.memory.encoder.encode_many([r["prompt"] for r in rows]) if rows else None  # unlocked
            engine = self.dr.engine
            with engine.state:
                memory = self.dr.memory
                n = absorb(memory, rows, self.dr.responses, vecs) if rows else 0
                reread_trust(memory, self.dr.store)
                watch = unknown_rows(memory)
            judged = [r for r in experiences_since(self.dr.store, 0, ids=watch) if r["outcome"] in OUTCOME_VALUE] \
                if watch else []   # read unlocked; applied only where memory still holds the row as unknown
            if judged:
                with engine.state:
                    self.verdicts += apply_verdicts(self.dr.memory, judged, self.dr.responses)
            self.absorbed += n
            self.polls += 1
            return n

    def start(self) -> None:
        """Poll every ``interval_s`` in a daemon thread until :meth:`stop` (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dreamroute-store-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background thread (a poll under way finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
                self.error = None
            except Exception as e:  # noqa: BLE001 - a poll that failed (store down) is retried next time
                if self.error != str(e):
                    log.warning("store sync of %s failed (retried every %.1f s): %s", self.dr.store.url,
                                self.interval_s, e)
                self.error = str(e)
