"""What requests still being answered are expected to spend, so concurrent requests share a budget.

A pacer learns a request's ATP only when the request is learned (``update``), so while N
requests are in flight each would see the budget as if it were alone and N of them could pass
the same affordability test at once. :class:`InFlight` (a mixin of both pacers) keeps, per
request thread, the ATP its chosen tier is expected to cost (:meth:`reserve` after routing,
:meth:`release` when the request has its answer, whatever happens), and :meth:`others` gives
the requests and joules of every *other* request in flight: the pacers' ``allows`` and guard
count them as already spent, so the running average they hold includes the requests not yet
learned (admission control in the manner of a reservation: a token bucket's "reserved" tokens).
In a run that answers one request at a time nothing is ever reserved by another thread, so
decisions are exactly those of a sequential run.
"""

from __future__ import annotations

import threading


class InFlight:
    """Per-thread reservations of expected ATP (J); see the module docstring. Thread-safe."""

    def _book(self) -> tuple[threading.Lock, dict[int, float]]:
        book = self.__dict__.get("_inflight")
        if book is None:
            book = self.__dict__.setdefault("_inflight", (threading.Lock(), {}))
        return book

    def reserve(self, atp: float) -> None:
        """Reserve ``atp`` J (>= 0; NaN or negative counts as 0) for the calling thread's request,
        replacing what it had reserved."""
        lock, res = self._book()
        with lock:
            res[threading.get_ident()] = atp if atp > 0 else 0.0

    def release(self) -> None:
        """Drop the calling thread's reservation (no error when it has none)."""
        lock, res = self._book()
        with lock:
            res.pop(threading.get_ident(), None)

    def others(self) -> tuple[int, float]:
        """(requests, J) reserved by threads other than the caller."""
        lock, res = self._book()
        me = threading.get_ident()
        with lock:
            vals = [v for k, v in res.items() if k != me]
        return len(vals), sum(vals)
