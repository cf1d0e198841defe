"""Concurrency: each tier's gate (how many calls at once, a bounded FIFO queue), and a quiesce lock.

The engine runs in worker threads (the server's, or a program's own), so everything here is
thread-based.

* :class:`TierGate`: at most ``limit`` calls on one tier at once (``TierConfig.max_in_flight``),
  the others waiting in a FIFO queue of at most ``max_queue`` (``TierConfig.max_queue``). A call
  that finds the queue full, or that waits past its deadline, raises
  :class:`~dreamroute.errors.TierBusyError` (the server's 503 with ``Retry-After``, as Ollama's
  full queue answers); a waiter whose cancel check turns True raises
  :class:`~dreamroute.errors.GenerationCancelled` with ``queued = True`` (it never ran). Waiting for
  one tier never blocks a call to another: each tier has its own gate, and nobody holds one gate
  while waiting for another. :meth:`TierGate.exclusive` takes a tier whole (no call in flight, none
  starts meanwhile): what freeing or swapping its model needs.
* :class:`Quiesce`: many readers (requests) or one writer (``DreamRoute.refresh_versions``, which
  swaps the learned memory): the writer waits until no request is in flight, and new requests wait
  while it works.

Lock order, so nothing deadlocks: quiesce → a tier gate → the engine's state lock
(``Engine.state``). A thread holding the state lock never waits for a gate, and a thread holding a
gate never waits for another gate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from ..backends.base import CancelCheck
from ..errors import GenerationCancelled, TierBusyError

POLL_S = 0.02
"""How often a waiter checks its cancel check, s."""

class _Ticket:
    __slots__ = ("exclusive",)

    def __init__(self, exclusive: bool):
        self.exclusive = exclusive


class TierGate:
    """At most ``limit`` calls at once on one tier, the rest in a bounded FIFO queue.

    Args:
        tier: the tier's name (for errors).
        limit: calls at once (>= 1).
        max_queue: waiters at most (>= 0; 0: a call that cannot start at once is refused).

    Attributes:
        in_flight: calls holding a slot now.
        peak: the most calls seen in flight at once.
        served / refused: calls admitted / refused with TierBusyError since start.
        mean_s: running mean seconds a call holds its slot (None before the first), used for
            the Retry-After of a refusal.
    """

    def __init__(self, tier: str, limit: int, max_queue: int):
        if limit < 1 or max_queue < 0:
            raise ValueError(f"tier {tier!r}: max_in_flight must be >= 1 and max_queue >= 0, "
                             f"got {limit} and {max_queue}")
        self.tier, self.limit, self.max_queue = tier, int(limit), int(max_queue)
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._exclusive = False
        self.in_flight = 0
        self.peak = 0
        self.served = 0
        self.refused = 0
        self.mean_s: float | None = None

    @property
    def waiting(self) -> int:
        """Calls waiting in the queue now."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No call in flight or waiting, and not held exclusively."""
        return not (self.in_flight or self._queue or self._exclusive)

    def retry_after_s(self) -> float:
        """When a refused call might find room, s: the queue ahead drained at ``limit`` calls of
        :attr:`mean_s` each (1 s per call before any was timed), at least 1."""
        per = self.mean_s if self.mean_s is not None else 1.0
        return max(1.0, math.ceil(per * (len(self._queue) + 1) / self.limit))

    def snapshot(self) -> dict:
        """``{limit, max_queue, in_flight, waiting, peak, served, refused}`` (JSON-ready)."""
        return {"limit": self.limit, "max_queue": self.max_queue, "in_flight": self.in_flight,
                "waiting": len(self._queue), "peak": self.peak, "served": self.served, "refused": self.refused}

    # ------------------------------------------------------------------ acquiring
    def _free(self, exclusive: bool) -> bool:
        if self._exclusive:
            return False
        return self.in_flight == 0 if exclusive else self.in_flight < self.limit

    def _take(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.served += 1
        self._cond.notify_all()   # the next in the queue may fit too

    def acquire(self, *, cancel: CancelCheck | None = None, deadline: float | None = None,
                exclusive: bool = False) -> None:
        """Take a slot (or, ``exclusive``, the whole tier), waiting in turn.

        Args:
            cancel: polled every :data:`POLL_S` s while waiting; True gives up.
            deadline: ``time.monotonic()`` after which waiting gives up (None: no limit).
            exclusive: wait until no call is in flight and hold every slot.

        Raises:
            TierBusyError: the queue is full (never for ``exclusive``), or the deadline passed
                while waiting.
            GenerationCancelled: ``cancel`` said stop while waiting (``queued`` True).
        """
        with self._cond:
            if not self._queue and self._free(exclusive):
                self._take(exclusive)
                return
            if not exclusive and len(self._queue) >= self.max_queue:
                self.refused += 1
                raise TierBusyError(self.tier, f"its queue is full ({self.in_flight} calls in flight, "
                                               f"{len(self._queue)} waiting; max_queue {self.max_queue})",
                                    retry_after_s=self.retry_after_s())
            t0 = time.monotonic()
            ticket = _Ticket(exclusive)
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and self._free(exclusive)):
                    if cancel is not None and cancel():
                        e = GenerationCancelled(f"the client went away while the request waited for tier "
                                                f"{self.tier!r}")
                        e.queued = True
                        raise e
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        self.refused += 1
                        raise TierBusyError(self.tier, f"it stayed busy for the {now - t0:.1f} s the request could "
                                                       f"wait ({self.in_flight} calls in flight, "
                                                       f"{len(self._queue) - 1} more waiting)",
                                            retry_after_s=self.retry_after_s())
                    wait = None if cancel is None else POLL_S
                    if deadline is not None:
                        wait = min(wait if wait is not None else math.inf, deadline - now)
                    self._cond.wait(wait)
                self._queue.popleft()
                self._take(exclusive)
            except BaseException:
                if ticket in self._queue:
                    self._queue.remove(ticket)
                    self._cond.notify_all()   # the head may have changed
                raise

    def try_acquire(self, exclusive: bool = False) -> bool:
        """Take a slot (or the whole tier) only if that needs no waiting; whether it was taken."""
        with self._cond:
            if not self._queue and self._free(exclusive):
                self._take(exclusive)
                return True
            return False

    def release(self, exclusive: bool = False, seconds: float | None = None) -> None:
        """Give back what :meth:`acquire` took; ``seconds``: how long it was held (for :attr:`mean_s`)."""
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self.in_flight = max(0, self.in_flight - 1)
                if seconds is not None:
                    self.mean_s = seconds if self.mean_s is None else 0.9 * self.mean_s + 0.1 * seconds
            self._cond.notify_all()

    @contextmanager
    def slot(self, *, cancel: CancelCheck | None = None, deadline: float | None = None) -> Iterator[None]:
        """``with gate.slot(...):`` one call on the tier (see :meth:`acquire`)."""
        self.acquire(cancel=cancel, deadline=deadline)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.release(seconds=time.monotonic() - t0)

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[bool]:
        """``with gate.exclusive(t) as held:`` the whole tier (no call in flight; new ones wait), or
        ``held`` False when that took longer than ``timeout`` s (0: only if it is idle now;
        None: wait as long as it takes). Used to free or swap the tier's model."""
        if timeout == 0:
            held = self.try_acquire(exclusive=True)
        else:
            try:
                self.acquire(exclusive=True, deadline=None if timeout is None else time.monotonic() + timeout)
                held = True
            except TierBusyError:
                held = False
        try:
            yield held
        finally:
            if held:
                self.release(exclusive=True)


class RequestState:
    """One request's own state, kept per thread while ``Engine.answer`` runs.

    Attributes:
        restored: tier → the :class:`~dreamroute.cache.reuse.Restore` made for this request.
        surprise_cpu_s: CPU seconds of its surprise scoring.
        wait_s: seconds it waited for tiers' turns.
        deadline: ``time.monotonic()`` after which it stops waiting for a tier (None: never).
    """

    __slots__ = ("restored", "surprise_cpu_s", "wait_s", "deadline")

    def __init__(self, timeout_s: float | None = None):
        self.restored: dict = {}
        self.surprise_cpu_s = 0.0
        self.wait_s = 0.0
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s


@contextmanager
def gated(gate: TierGate, run: RequestState, cancel: CancelCheck | None = None) -> Iterator[None]:
    """One call on ``gate``'s tier in its turn, for the request ``run`` (waiting up to its deadline,
    polling ``cancel``; the wait is added to ``run.wait_s``).

    Raises:
        TierBusyError: as :meth:`TierGate.acquire`.
        GenerationCancelled: ``cancel`` said stop while waiting (``tier`` set, ``queued`` True).
    """
    t0 = time.perf_counter()
    try:
        gate.acquire(cancel=cancel, deadline=run.deadline)
    except GenerationCancelled as e:
        e.tier = gate.tier
        raise
    finally:
        run.wait_s += time.perf_counter() - t0
    t1 = time.monotonic()
    try:
        yield
    finally:
        gate.release(seconds=time.monotonic() - t1)


@contextmanager
def all_exclusive(gates: dict[str, TierGate]) -> Iterator[None]:
    """Every tier whole, taken in the dict's order (waiting as long as it takes)."""
    taken: list[TierGate] = []
    try:
        for g in gates.values():
            g.acquire(exclusive=True)
            taken.append(g)
        yield
    finally:
        for g in reversed(taken):
            g.release(exclusive=True)


class Quiesce:
    """Many readers at once, or one writer alone (writers first: a waiting writer holds off new
    readers). Requests are readers; swapping the learned memory is a writer."""

    def __init__(self):
        self._cond = threading.Condition()
        self.readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self.readers += 1
        try:
            yield
        finally:
            with self._cond:
                self.readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self.readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
