"""Cooldown of failing tiers: which tiers a request may use now, and where a failed call goes.

A tier whose backend failed (BackendError, a timeout) is skipped for
``seconds``, or for as long as the upstream's ``Retry-After`` asked; meanwhile it is
not called for anything (policies see only the available tiers, ``RouteView.available``;
surprise scoring and warm handoffs skip it), and where a call goes instead is decided
by :mod:`dreamroute.router.faults`.
"""

from __future__ import annotations

import time
from typing import Callable


class Cooldown:
    """Per-tier cooldown deadlines.

    Args:
        tiers: tier names, cheapest first.
        seconds: how long a failed tier is skipped (None: no fallback at all: a failure
            fails the request, and only an upstream's Retry-After cools the tier; 0: fall
            back but never skip).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, tiers: list[str], seconds: float | None, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"cooldown seconds must be >= 0 (or None: no fallback), got {seconds}")
        self.tiers = list(tiers)
        self.seconds = seconds
        self.clock = clock
        self.until: dict[str, float] = {}
        self.reasons: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether failed calls fall back to another tier."""
        return self.seconds is not None

    def cool(self, tier: str, seconds: float | None = None, reason: str = "") -> bool:
        """Skip ``tier`` for ``seconds`` (an upstream's Retry-After) or, when None, for the configured
        ``seconds`` (None there too: not at all). A later deadline is never shortened. ``reason``
        (the backend's message) is kept for errors about the tier. Returns whether it is cooling now."""
        s = self.seconds if seconds is None else max(0.0, float(seconds))
        if s is None:
            return False
        self.until[tier] = max(self.until.get(tier, 0.0), self.clock() + s)
        self.reasons[tier] = reason
        return self.until[tier] > self.clock()

    def cooling(self, tier: str) -> float:
        """Seconds until ``tier`` may be called again (0.0: now)."""
        return max(0.0, self.until.get(tier, 0.0) - self.clock())

    def available(self) -> list[str]:
        """Tiers not cooling down, cheapest first."""
        now = self.clock()
        return [t for t in self.tiers if self.until.get(t, 0.0) <= now]

    def remaining(self) -> dict[str, float]:
        """Cooling tiers → seconds left."""
        now = self.clock()
        return {t: round(u - now, 3) for t, u in list(self.until.items()) if u > now}
