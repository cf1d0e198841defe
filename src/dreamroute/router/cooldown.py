"""Cooldown of failing tiers: which tiers a request may use now, and where a failed call goes.

A tier whose backend failed (BackendError, a timeout) is skipped for
``seconds``; meanwhile policies see only the available tiers (``RouteView.available``)
and a call meant for a cooled tier goes to the next available tier up, else down.
"""

from __future__ import annotations

import time
from typing import Callable


class Cooldown:
    """Per-tier cooldown deadlines.

    Args:
        tiers: tier names, cheapest first.
        seconds: how long a failed tier is skipped (None: no fallback at all: a failure
            fails the request, as in ``run``; 0: fall back but never skip).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, tiers: list[str], seconds: float | None, clock: Callable[[], float] = time.monotonic):
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"cooldown seconds must be >= 0 (or None: no fallback), got {seconds}")
        self.tiers = list(tiers)
        self.seconds = seconds
        self.clock = clock
        self.until: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        """Whether failed calls fall back to another tier."""
        return self.seconds is not None

    def cool(self, tier: str) -> None:
        """Skip ``tier`` for the next ``seconds``."""
        self.until[tier] = self.clock() + (self.seconds or 0.0)

    def available(self) -> list[str]:
        """Tiers not cooling down, cheapest first."""
        now = self.clock()
        return [t for t in self.tiers if self.until.get(t, 0.0) <= now]

    def remaining(self) -> dict[str, float]:
        """Cooling tiers → seconds left."""
        now = self.clock()
        return {t: round(u - now, 3) for t, u in list(self.until.items()) if u > now}

    def fallback(self, tier: str, tried: list[str], up_only: bool = False) -> str | None:
        """The nearest available tier above ``tier`` not in ``tried``, else (unless ``up_only``)
        the nearest below it; None when there is none."""
        i, avail = self.tiers.index(tier), [t for t in self.available() if t not in tried]
        above = [t for t in self.tiers[i + 1:] if t in avail]
        below = [t for t in reversed(self.tiers[:i]) if t in avail]
        return (above or ([] if up_only else below) or [None])[0]
