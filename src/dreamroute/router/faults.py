"""Faults: where a call goes when its tier fails or is cooling down, and what a fallback may cost.

The rules (README, "Faults"):

- **Pinned requests** (the request names a tier, ``Request.tier``; or the policy is
  ``always:TIER`` outside CRISIS; or fallback is off, ``cooldown_s=None``) are answered by
  that tier or fail: :class:`~dreamroute.errors.TierCoolingError` when it is cooling down
  (it is not called), :class:`~dreamroute.errors.TierError` with the backend's message when
  its call fails. Another tier never answers them.
- **Routed requests** skip a failed or cooling tier. The fallback is the *cheapest available
  tier the budget allows*: not cooling, not already tried for this request, and affordable
  (below); an escalation falls back only to tiers above the one that failed, and a failed
  audit is dropped. In CRISIS the fallback is the highest available tier, whatever the budget
  (the only case that may spend past it). When the first call has nowhere left to go, the
  request fails with :class:`~dreamroute.errors.NoTierAvailableError` (the server's 503,
  ``run``'s failed item; stored as ``background_work`` kind ``unanswered``, ``detail`` why);
  a failed escalation keeps the answer it had.
- **Affordable** ("the budget allows"): with a budget of B J per request, a pacer that has
  charged ``spent`` J over ``n`` requests, and ``so_far`` J already spent on this request
  (surprise scoring, earlier calls), tier t is affordable when
  ``(spent + so_far + E[ATP_t]) / (n + 1) <= B``, i.e. ``E[ATP_t] <= B·(n+1) − spent − so_far``:
  the running average, with this request counted, stays within the budget
  (:meth:`~dreamroute.router.dual_pacer.BudgetPacer.allows`, the same test an audit passes).
  E[ATP_t] is the policy's estimate for this request (``Decision.expected_atp``) or, for a
  policy without one, :meth:`~dreamroute.router.memory.Memory.expected_atp` (the mean ATP of
  the tier's nearest experiences, else its mean, else the cost model). No budget: every tier
  is affordable.
- **Every failed call** (BackendError, TimeoutError) is charged no ATP, cools its tier for the
  upstream's ``Retry-After`` when it sent one, else for ``cooldown_s`` (not when the upstream
  blamed the request: HTTP 400/413/422, :func:`request_error`), is logged (a warning on
  ``dreamroute.router``), stored (``background_work`` kind ``failed_call``: tier, seconds,
  ``status``, ``detail`` = the backend's message, ``request_id``), reported to
  ``Engine.on_failure`` and listed in ``Answer.failures``.
- **A busy tier** (:class:`~dreamroute.errors.TierBusyError`: its queue is full, or the request
  waited past its deadline) is not a failure: no cooldown, no record, no fallback. The first call
  fails the request with it; a busy escalation keeps the answer it had; a busy audit is dropped.

Concurrency: the per-request state (failures, the plan) is kept per thread (a request runs in one
thread); cooldown, pacer and records are touched under the engine's state lock.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..errors import BackendError, NoTierAvailableError, TierBusyError, TierCoolingError, TierError
from .types import Call, FailedCall, Request

log = logging.getLogger("dreamroute.router")

CallFn = Callable[[str, str, Request], Call]


REQUEST_ERROR_STATUS = (400, 413, 422)
"""Upstream HTTP statuses that blame the request, not the tier (bad or too long): no cooldown."""


def request_error(error: BaseException) -> bool:
    """Whether ``error`` is an upstream's refusal of the request itself (HTTP 400, 413 or 422)
    rather than a failure of its tier (timeouts, 5xx, 429, a dead connection, 401/404 of a
    misconfigured tier)."""
    return getattr(error, "status", None) in REQUEST_ERROR_STATUS


class Faults:
    """The fault rules above for one engine; :meth:`begin` and :meth:`plan` set them up for each request.

    Args:
        engine: the :class:`~dreamroute.router.engine.Engine` (its tiers, cooldown, pacer,
            store, memory, run id and ``on_failure``).

    Attributes:
        failures: the failed calls of the current request (this thread's), in order.
        pinned / crisis: whether the current request is pinned to its tier / routed in CRISIS.
    """

    def __init__(self, engine):
        self.engine = engine
        self._local = threading.local()
        self.begin()

    # the current request's plan, per thread
    failures = property(lambda self: self._now("failures"))
    pinned = property(lambda self: self._now("pinned"))
    crisis = property(lambda self: self._now("crisis"))
    _expected = property(lambda self: self._now("expected"))
    _spent = property(lambda self: self._now("spent"))

    def _now(self, name: str):
        if not hasattr(self._local, name):
            self.begin()
        return getattr(self._local, name)

    def begin(self) -> None:
        """Start a request: no failures yet; routed, outside CRISIS, nothing spent (until :meth:`plan`)."""
        loc = self._local
        loc.failures, loc.pinned, loc.crisis = [], False, False
        loc.expected, loc.spent = (lambda tier: 0.0), (lambda: 0.0)

    def plan(self, *, pinned: bool, crisis: bool, expected: Callable[[str], float],
             spent: Callable[[], float]) -> None:
        """Set the rules for the request's calls, once it is routed: ``expected(tier)`` is a tier's
        expected ATP for it (J), ``spent()`` what it has cost so far (J). Failures so far are kept."""
        loc = self._local
        loc.pinned, loc.crisis = pinned, crisis
        loc.expected, loc.spent = expected, spent

    # ---- the budget ------------------------------------------------------------------
    def allowance(self) -> float | None:
        """ATP the budget allows one more call of this request now, J (may be negative; None:
        no budget): B·(n+1) − spent − so_far."""
        p = self.engine.pacer
        if p.budget is None:
            return None
        n_other, j_other = p.others()   # other requests in flight count as spent (InFlight)
        return p.budget * (p.n + n_other + 1) - p.spent - j_other - self._spent()

    def affordable(self, tier: str) -> bool:
        """Whether calling ``tier`` keeps the running average within the budget (always in CRISIS)."""
        return self.crisis or self.engine.pacer.allows(self._spent() + self._expected(tier))

    # ---- calling ---------------------------------------------------------------------
    def check(self, tier: str) -> None:
        """Raise TierCoolingError when a pinned ``tier`` is cooling down (a request naming it
        is refused before anything is done for it)."""
        wait = self.engine.cooldown.cooling(tier)
        if wait > 0:
            raise TierCoolingError(tier, self.engine.cooldown.reasons.get(tier) or "an earlier failure",
                                   retry_after_s=wait)

    def call(self, tier: str, role: str, request: Request, do_call: CallFn) -> Call | None:
        """``do_call(tier, role, request)`` under the rules above.

        Returns the Call, or None for a dropped audit or an escalation with nowhere to go (or,
        pinned, one meant for a cooling tier: it is not made).

        Raises:
            TierCoolingError / TierError: a pinned request's tier is cooling / failed.
            NoTierAvailableError: a routed first call found no tier to answer.
        """
        cd = self.engine.cooldown
        strict = self.pinned or not cd.enabled
        first, started = tier, time.perf_counter()
        tried: list[str] = []
        failed: dict[str, str] = {}
        unaffordable: dict[str, float] = {}
        last: BaseException | None = None
        while True:
            if strict:
                if role != "chosen" and cd.cooling(tier) > 0:
                    return None  # an escalation or audit of a cooling tier is not made
                self.check(tier)
            if cd.cooling(tier) == 0:
                t0 = time.perf_counter()
                try:
                    return do_call(tier, role, request)
                except TierBusyError as e:
                    if role == "chosen":
                        raise
                    log.info("%s call to tier %s skipped for request %s: %s", role, tier, request.request_id, e)
                    return None  # a busy escalation keeps the answer it had; a busy audit is dropped
                except (BackendError, TimeoutError) as e:
                    f = self.record(tier, role, request, e, time.perf_counter() - t0)
                    if strict:
                        raise TierError(tier, f.error, status=f.status, retry_after_s=cd.cooling(tier) or None) from e
                    failed[tier], last = f.error, e
            tried.append(tier)
            if role == "audit":
                return None
            with self.engine.state:
                tier = self._fallback(tier, role, tried, unaffordable)
                err = self._nothing_left(failed, unaffordable) if tier is None and role != "escalated" else None
            if tier is None:
                if role == "escalated":
                    return None
                eng = self.engine
                eng.store.record_background("unanswered", first, 0, 0.0, time.perf_counter() - started,
                                            conversation_id=request.conversation_id, run_id=eng.run_id,
                                            detail=str(err), request_id=request.request_id)
                log.warning("request %s not answered: %s", request.request_id, err)
                raise err from last

    def _fallback(self, failed: str, role: str, tried: list[str], unaffordable: dict[str, float]) -> str | None:
        """The next tier to try after ``failed`` (see the module docstring), noting in
        ``unaffordable`` each one skipped for the budget."""
        tiers = self.engine.tiers
        avail = [t for t in self.engine.cooldown.available() if t not in tried]
        if role == "escalated":
            avail = [t for t in avail if tiers.index(t) > tiers.index(failed)]
        for t in reversed(avail) if self.crisis else avail:
            if self.affordable(t):
                return t
            unaffordable[t] = self._expected(t)
        return None

    def _nothing_left(self, failed: dict[str, str], unaffordable: dict[str, float]) -> NoTierAvailableError:
        cd = self.engine.cooldown
        cooling = {t: s for t, s in cd.remaining().items() if t not in failed}
        allowance = self.allowance()
        parts = [f"{t} failed ({m})" for t, m in failed.items()]
        parts += [f"{t} is cooling down for {s:.0f} s more ({cd.reasons.get(t) or 'an earlier failure'})"
                  for t, s in cooling.items()]
        parts += [f"{t} would cost {j:.1f} J, more than the {max(allowance or 0.0, 0.0):.1f} J the budget "
                  f"({self.engine.pacer.budget:g} J per request) allows now" for t, j in unaffordable.items()]
        waits = [s for s in cd.remaining().values() if s > 0]
        return NoTierAvailableError("no tier could answer this request: " + "; ".join(parts or ["no tier left"]),
                                    failed=failed, cooling=cooling, unaffordable=unaffordable,
                                    allowance_j=allowance, retry_after_s=min(waits) if waits else None)

    # ---- recording -------------------------------------------------------------------
    def record(self, tier: str, role: str, request: Request, error: BaseException, seconds: float) -> FailedCall:
        """Cool ``tier`` (the upstream's Retry-After, else ``cooldown_s``), then log, store and report
        the failed call (its seconds, no ATP). An upstream that refused the request itself
        (:func:`request_error`: HTTP 400, 413 or 422, e.g. ``context_length_exceeded``) is not
        cooled: one client's bad request must not take the tier from everyone. Returns the
        :class:`FailedCall`."""
        eng = self.engine
        status = getattr(error, "status", None)
        message = str(error) or type(error).__name__
        with eng.state:
            if not request_error(error):   # the request's own fault (too long, malformed) leaves the tier up
                eng.cooldown.cool(tier, getattr(error, "retry_after_s", None), reason=message)
            failed = FailedCall(tier, role, message, seconds, request.request_id, status, eng.cooldown.cooling(tier))
        self.failures.append(failed)
        log.warning("tier %s failed (%s call, %s) for request %s: %s; %s", tier, role,
                    f"HTTP {status}" if status is not None else type(error).__name__, request.request_id, message,
                    f"skipped for {failed.cooled_s:.0f} s" if failed.cooled_s > 0 else "not skipped")
        eng.store.record_background("failed_call", tier, 0, 0.0, seconds, model_version_id=eng.memory.versions.get(tier),
                                    conversation_id=request.conversation_id, run_id=eng.run_id, status=status,
                                    detail=message, request_id=request.request_id)
        if eng.on_failure is not None:
            eng.on_failure(failed)
        return failed
