"""The dual pacer: budget pacing by a smoothed multiplicative dual update of λ (``pacer: dual``).

Its own file because it is a pacer, not learned routing state: it is one of the two
interchangeable pacers :func:`~dreamroute.router.pacing.make_pacer` builds (the default
:class:`~dreamroute.router.pacing.SpendController` keeps its interface), and the engine
and policies hold it beside :class:`~dreamroute.router.memory.Memory`, never inside it.
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from .inflight import InFlight


class BudgetPacer(InFlight):
    """Budget-paced λ, so the running average ATP per request follows the budget B.

    Spending is smoothed with an exponential moving average over about
    ``horizon`` requests, s ← s + (a_t − s)/H, and λ follows a multiplicative
    dual update, log λ ← log λ + η (s / B − 1), clipped to [λ_min, λ_max]
    (online dual descent on the budget constraint, as in budget pacing for
    ad auctions: Balseiro & Gur 2019, "Learning in repeated auctions with
    budgets"; the update is in log space so one rule works whatever the
    ratio of a tier's ATP to the budget, and it is smoothed so that, within a
    window, λ is nearly constant and the requests with the best gain per
    joule are the ones that get the expensive tiers). Without a budget (None)
    nothing is priced; a budget of 0 prices every call that costs anything out.
    """

    LAMBDA_MIN = 1e-4
    LAMBDA_MAX = 1e4

    def __init__(self, budget: float | None, rate: float, lam0: float = 1.0, horizon: int = 50):
        if budget is not None and not budget >= 0:
            raise ConfigError(f"budget must be >= 0 J per request (or omitted for no budget), got {budget}")
        self.budget = budget
        self.rate = rate
        self.horizon = horizon
        self.lam = min(self.LAMBDA_MAX, max(self.LAMBDA_MIN, lam0)) if budget else 0.0
        self.smoothed = budget or 0.0
        self.spent = 0.0
        self.n = 0

    def charge(self, atp: float) -> None:
        """Spend ``atp`` J outside any request (background work, e.g. a warm-handoff prefill):
        it counts toward the running average of the next requests."""
        self.spent += atp
        self.smoothed += atp / min(max(self.n, 1), self.horizon)

    def update(self, atp: float) -> None:
        self.spent += atp
        self.n += 1
        self.smoothed += (atp - self.smoothed) / min(self.n, self.horizon)
        if self.budget:
            step = self.rate * (self.smoothed / self.budget - 1.0)
            self.lam = min(self.LAMBDA_MAX, max(self.LAMBDA_MIN, self.lam * math.exp(max(-5.0, min(5.0, step)))))

    @property
    def average(self) -> float:
        return self.spent / self.n if self.n else 0.0

    @property
    def binding(self) -> bool:
        """True while the budget constrains spending (λ above its floor, or a zero budget)."""
        return self.budget is not None and (self.budget == 0 or self.lam > 2 * self.LAMBDA_MIN)

    def allows(self, extra: float) -> bool:
        """True when spending ``extra`` more now keeps the running average within budget (other
        threads' requests in flight counted as spent: :class:`~.inflight.InFlight`)."""
        if self.budget is None:
            return True
        n_other, j_other = self.others()
        return (self.spent + j_other + extra) / (self.n + n_other + 1) <= self.budget + 1e-12

    def price(self, atp: float) -> float:
        """λ · ATP / B, the cost term in p̂ − λ·ATP (ATP normalised by the budget); ∞ for a
        call that costs anything under a zero budget."""
        if self.budget is None:
            return 0.0
        if self.budget == 0:
            return math.inf if atp > 0 else 0.0
        return self.lam * atp / self.budget

