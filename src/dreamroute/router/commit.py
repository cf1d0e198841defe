"""Group commit: the records of requests that finish together written in one transaction.

A request's experiences, trust updates and ledger entries are one transaction, and a
commit on SQLite with ``synchronous = FULL`` waits for the disk (an fsync: milliseconds).
Committed one request at a time, under the engine's state lock, every other request waited
for that fsync even to route. :class:`GroupCommit` does what databases and LLM servers do
instead: while one transaction commits, the requests that finish meanwhile queue; the
next transaction writes all of them (each its own rows and entries, in queue order) and
commits once; then each one's learning (memory, pacer, policy) is applied, in the same
order, and only then is each request answered. So nothing is learned before it is
committed, nothing is answered before it is on disk, and the order the ledger records is
the order the memory learned in.

The thread whose request finds no commit in progress writes the batch (the leader); the
others wait for it, and one of those still waiting leads the next batch. A failed batch is
written again one request at a time, so one bad request fails only itself.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class _Item:
    __slots__ = ("payload", "result", "error", "done", "wake")

    def __init__(self, payload: Any):
        self.payload, self.result, self.error, self.done = payload, None, None, False
        self.wake = threading.Event()   # set once done, or when its thread is to lead the next batch


class GroupCommit:
    """Batches ``write`` calls from many threads; see the module docstring.

    Args:
        write: payloads → their results, in ONE transaction (raises: none of them is kept).
        apply: ``apply(payload, result)`` for each written payload, in order, after the commit
            (its exception is that payload's caller's).
        lock: held around the applies of a batch (the engine's state lock), never while writing.

    Attributes:
        commits: transactions written; ``items``: payloads written (``items / commits`` is the
            mean batch size).
    """

    def __init__(self, write: Callable[[list], list], apply: Callable[[Any, Any], Any], lock):
        self._write, self._apply, self._lock = write, apply, lock
        self._mu = threading.Lock()
        self._queue: list[_Item] = []
        self._busy = False   # a leader is writing or applying a batch
        self.commits = 0
        self.items = 0

    def submit(self, payload: Any) -> Any:
        """Write ``payload`` (with whatever else is queued), apply it, and return what ``apply``
        returned; raises the write's or the apply's error. Call it without holding ``lock``.
        Each waiting thread is woken once: when its payload is done, or to lead the next batch."""
        item = _Item(payload)
        with self._mu:
            self._queue.append(item)
            lead = not self._busy
            self._busy = True
        if not lead:
            item.wake.wait()
            if item.done:
                return self._outcome(item)
        # the leader: write what is queued (its own payload among it), then hand over
        with self._mu:
            batch, self._queue = self._queue, []
        try:
            self._run(batch)
        finally:
            for it in batch:
                if not it.done:   # only after an unexpected BaseException: nobody waits forever
                    it.error, it.done = it.error or RuntimeError("the group commit was interrupted"), True
                if it is not item:
                    it.wake.set()
            with self._mu:
                if self._queue:
                    self._queue[0].wake.set()   # not done: its thread leads the next batch
                else:
                    self._busy = False
        return self._outcome(item)

    @staticmethod
    def _outcome(item: _Item) -> Any:
        if item.error is not None:
            raise item.error
        return item.result

    def _run(self, batch: list[_Item]) -> None:
        try:
            results = self._write([it.payload for it in batch])
        except Exception as e:  # noqa: BLE001 - each payload's own outcome, below
            if len(batch) == 1:
                batch[0].error, batch[0].done = e, True
                return
            for it in batch:   # one by one: only the payloads that fail themselves fail
                self._run([it])
            return
        self.commits += 1
        self.items += len(batch)
        with self._lock:
            for it, res in zip(batch, results):
                try:
                    it.result = self._apply(it.payload, res)
                except Exception as e:  # noqa: BLE001 - raised in that payload's caller
                    it.error = e
                it.done = True
