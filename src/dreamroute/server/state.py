"""The app's state object: :class:`ServerState`, everything one app built by
:func:`~dreamroute.server.app.create_app` holds (no module-level state), with the worker-thread
limiters that bound how many requests run at once and the deadline for a request's tiers' turns.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import anyio
from anyio.lowlevel import RunVar

from ..api import DreamRoute
from ..config import Settings
from ..errors import GenerationCancelled
from .errors import APIError
from .fastpath import FastPath
from .generation import POLL_S, Disconnect
from .metabolism import Metabolism
from .metrics import ServerMetrics

SPARE_WORKERS = 16
"""Worker threads beyond the tiers' ``max_in_flight + max_queue`` (feedback, token counting)."""
_LIMITERS: RunVar[weakref.WeakKeyDictionary] = RunVar("dreamroute_limiters")  # per event loop: state → limiters


class ServerState:
    """Everything one app holds (no module-level state): settings, the DreamRoute, metrics, the fast
    path, the start time, the metabolism (None when it is off) and the requests in flight.

    Attributes:
        in_flight: model requests running or waiting now (counted in the event loop).
        capacity: worker threads at most: every tier's ``max_in_flight + max_queue``, plus
            :data:`SPARE_WORKERS`.
    """

    def __init__(self, settings: Settings, dr: DreamRoute, own: bool):
        self.settings, self.dr, self.own = settings, dr, own
        self.metabolism: Metabolism | None = None
        self.in_flight = 0
        self.capacity = sum(g.limit + g.max_queue for g in dr.engine.gates.values()) + SPARE_WORKERS
        self.metrics = ServerMetrics(dr, lambda: self.metabolism)
        self.fast = FastPath(dr)
        self.started = time.time()
        self.answered = 0
        dr.engine.on_failure = lambda f: self.metrics.backend_failures.labels(f.tier).inc()

    async def run(self, fn, *args, request: bool = False, cancel: Disconnect | None = None) -> Any:
        """``fn(*args)`` in a worker thread (503 ``server_busy`` when none is free within
        ``request_timeout_s``). ``request``: a model request, counted in flight (here and by the
        metabolism) from now, its waits included, until it ends, answered or not: no REST, DREAM or
        warm-handoff prefill starts meanwhile, and idle time counts from its end. ``cancel``: a
        request still waiting for a worker when its client disconnects gives up (GenerationCancelled)
        without running ``fn``."""
        timeout = self.settings.server.request_timeout_s
        ctl = self.metabolism.ctl if request and self.metabolism is not None else None
        if request:
            self.in_flight += 1
        if ctl is not None:
            ctl.begin_request()
        try:
            return await self._run(fn, args, timeout, cancel)
        finally:
            if request:
                self.in_flight -= 1
            if ctl is not None:
                ctl.end_request()

    def _limiters(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        """This event loop's (slots, threads) limiters of :attr:`capacity` each: a slot is waited
        for with a timeout, then the thread runs under the other (never the one that waits)."""
        try:
            per_loop = _LIMITERS.get()
        except LookupError:
            per_loop = weakref.WeakKeyDictionary()
            _LIMITERS.set(per_loop)
        if self not in per_loop:
            per_loop[self] = (anyio.CapacityLimiter(self.capacity), anyio.CapacityLimiter(self.capacity))
        return per_loop[self]

    async def _run(self, fn, args, timeout: float, cancel: Disconnect | None = None) -> Any:
        """``fn(*args)`` in a worker thread once one is free (503 after ``timeout`` s;
        GenerationCancelled when ``cancel`` is set first)."""
        slots, threads = self._limiters()
        deadline = time.monotonic() + timeout
        got = False
        while not got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(503, f"The server stayed busy for {timeout:g} s ({self.capacity} requests at "
                                    "once); retry later.", code="server_busy", headers={"Retry-After": "1"})
            with anyio.move_on_after(min(POLL_S, left) if cancel is not None else left):
                await slots.acquire()
                got = True
            if not got and cancel is not None and cancel():
                raise GenerationCancelled("the client went away while the request waited for a worker")
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=threads)
        finally:
            slots.release()

    def deadline(self) -> float:
        """``time.monotonic()`` by which a request arriving now must have its tiers' turns."""
        return time.monotonic() + self.settings.server.request_timeout_s

    async def idle(self) -> None:
        """Between requests: run one queued warm-handoff prefill if no request is in flight."""
        kv = self.dr.engine.kv
        if kv is None or not kv.pending or self.in_flight:
            return

        def work():
            if self.in_flight == 0:
                self.dr.idle(1)   # skips a job whose tier is busy (Engine.idle)
        await anyio.to_thread.run_sync(work)
