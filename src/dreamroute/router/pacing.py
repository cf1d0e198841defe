"""Spend control: the price λ of a joule, so that spending holds the budget in every window.

``--budget B`` is the average ATP per request over the run (J). The router picks,
per request, the candidate (a tier, or a tier as the first step of a cascade) that
maximises value − λ·ATP/B (:class:`~dreamroute.router.policies.DreamroutePolicy`).
:class:`SpendController` sets λ from three parts:

1. **The price of the recent requests (feed-forward).** Each routed request leaves
   its *menu*: the value v_c (expected success, as the policy drew it) and expected
   ATP a_c of every candidate it had. λ is the smallest price at which the requests
   of a sliding window of ``window`` menus, routed again, would spend the target
   rate ρ per request:

       λ = min { λ ∈ [λ_min, λ_max] : Σ_i w_i a_i(λ) / Σ_i w_i ≤ ρ },
       a_i(λ) = a of argmax_c v_ic − λ a_ic / B,  w_i = 2^(−age_i / half_life)

   i.e. the dual price of the budget constraint of the linear programme over the
   observed requests, re-solved as requests arrive (the "dynamic learning"
   algorithm of Agrawal, Wang & Ye, "A dynamic near-optimal algorithm for online
   linear programming", Operations Research 2014; earlier Devanur & Hayes, EC
   2009, for budgeted matching under random order). The price is a function of the
   window and ρ only, never of its own past, so it cannot drift to a floor during a
   cheap run and then need many requests to climb back (the failure of a
   multiplicative dual update, log λ ← log λ + η(s/B − 1)); it is bounded by
   [λ_min, λ_max], and a change in the traffic moves it as soon as the window
   holds the new requests. Because it prices a window of *values*, not of time, a
   run of hard requests gets the expensive tiers when they are worth more per
   joule than what the window held, and a run of easy ones does not. The weights
   w_i halve every ``half_life`` requests: a menu made while the router still
   knew little (its values were guesses) fades as it learns.

2. **The bank (feedback).** bank = B·n − spent, what the run saved so far (negative:
   overspent). The target rate is ρ = B + bank/H', H' = min(H, n + 10), clipped to
   [ρ_min·B, ρ_max·B]: savings are spent over about H' requests and an overspend is
   paid back the same way: a symmetric integral term that also corrects any bias of the expected ATP
   (escalations, audits, surprise scoring) against what was charged. With bank ≥ 0
   at the end, the whole run is within budget.

3. **The guard (a hard limit).** :meth:`headroom` is what one request may still
   spend so that the running average stays within cap·B after it, with a credit of
   ``credit``·B J for the first requests:
   headroom = cap·B·(n + 1) + credit·B − spent. The policy does not choose (and does
   not escalate to) a candidate whose expected ATP exceeds it. After n requests the
   running average is at most cap + credit/n times the budget (1.03 + 1/50 < 1.10
   after 50 requests with the defaults; the actual ATP of a call may differ from
   its expectation, which the bank then pays back).

λ_min is ``lam_floor``: a call that costs the whole per-request budget must buy
at least that much success probability, so a budget that does not bind is not
spent on draws that differ by noise (the saving is kept for requests that need
it). Until ``min_menus`` menus have been seen, λ is ``lam0``. ``binding`` is True while
λ is above its floor (the budget constrains the choice): audits run only when it
is not. Without a budget nothing is priced (λ = 0, no guard); a budget of 0 prices
every call that costs anything out.

The interface is :class:`~dreamroute.router.dual_pacer.BudgetPacer`'s (``budget``,
``lam``, ``spent``, ``n``, ``average``, ``smoothed``, ``binding``, ``charge``,
``update``, ``allows``, ``price``), plus ``observe`` (a menu), ``headroom`` and
``target``.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from .inflight import InFlight


class SpendController(InFlight):
    """λ from the recent requests' menus, a bank of savings, and a guard (module docstring).

    Args:
        budget: average ATP per request, J (None: no budget; 0: only free calls).
        lam0: λ before ``min_menus`` menus have been seen.
        window: menus kept (the most recent ones).
        horizon: H, requests over which the bank (savings or overspend) is spent or paid back.
        cap: the running average the guard holds, as a multiple of the budget.
        credit: J the guard lends the first requests, as a multiple of the budget.
        rate_bounds: (ρ_min, ρ_max), the target rate's bounds as multiples of the budget.
        refit_every: re-solve λ after this many updates (and whenever a menu arrives first).
        min_menus: menus needed before λ is solved from them.
        smoothing: requests of the exponential moving average reported as ``smoothed``.
        half_life: requests after which a menu counts half as much in the price.
        lam_floor: the least price: paying the whole per-request budget must buy at least this
            much success probability, however much the budget leaves unspent.

    Raises:
        ConfigError: a negative budget or a setting out of range.
    """

    LAMBDA_MIN = 1e-4
    LAMBDA_MAX = 1e4

    def __init__(self, budget: float | None, *, lam0: float = 1.0, window: int = 1500, horizon: int = 200,
                 cap: float = 1.03, credit: float = 1.0, rate_bounds: tuple[float, float] = (0.25, 4.0),
                 refit_every: int = 5, min_menus: int = 10, smoothing: int = 50, lam_floor: float = 0.05,
                 half_life: float = 150.0):
        if budget is not None and not budget >= 0:
            raise ConfigError(f"budget must be >= 0 J per request (or omitted for no budget), got {budget}")
        if window < 1 or horizon < 1 or refit_every < 1 or min_menus < 1 or smoothing < 1 or not half_life > 0:
            raise ConfigError("pacing window, horizon, refit_every, min_menus and smoothing must be >= 1 "
                              "and the half-life > 0")
        if cap < 1.0 or credit < 0 or not 0 <= rate_bounds[0] <= 1.0 <= rate_bounds[1]:
            raise ConfigError(f"pacing needs cap >= 1, credit >= 0 and rate bounds lo <= 1 <= hi, got "
                              f"cap {cap}, credit {credit}, bounds {rate_bounds}")
        if not 0 < lam_floor <= self.LAMBDA_MAX:
            raise ConfigError(f"the price floor must be in (0, {self.LAMBDA_MAX:g}], got {lam_floor}")
        self.budget = budget
        self.lam_floor = lam_floor
        self.lam0 = min(self.LAMBDA_MAX, max(lam_floor, lam0))
        self.lam = self.lam0 if budget else 0.0
        self.window = window
        self.horizon = horizon
        self.cap = cap
        self.credit = credit
        self.rate_bounds = rate_bounds
        self.refit_every = refit_every
        self.min_menus = min_menus
        self.smoothing = smoothing
        self.half_life = half_life
        self.spent = 0.0
        self.n = 0
        self.smoothed = budget or 0.0
        # the window of menus as two ring buffers (values padded with −inf, ATPs with 0)
        self._V = np.full((window, 1), -np.inf)
        self._A = np.zeros((window, 1))
        self._count = 0  # menus ever observed (the next one goes to slot count % window)
        self._since_fit = 0

    # ---- the BudgetPacer interface -----------------------------------------------------
    def charge(self, atp: float) -> None:
        """Spend ``atp`` J outside any request (background work, e.g. a warm-handoff prefill):
        it counts toward the run's spending (the bank and the guard) like a request's ATP."""
        self.spent += atp
        self.smoothed += atp / min(max(self.n, 1), self.smoothing)

    def update(self, atp: float) -> None:
        """One request finished, having cost ``atp`` J in all (every call, scoring included)."""
        self.spent += atp
        self.n += 1
        self.smoothed += (atp - self.smoothed) / min(self.n, self.smoothing)
        self._since_fit += 1
        if self.budget and self._since_fit >= self.refit_every:
            self.refit()

    @property
    def average(self) -> float:
        """Running average ATP per request, J (0 before any request)."""
        return self.spent / self.n if self.n else 0.0

    @property
    def binding(self) -> bool:
        """True while the budget constrains spending (λ above its floor, or a zero budget)."""
        return self.budget is not None and (self.budget == 0 or self.lam > self.lam_floor * (1 + 1e-6))

    def allows(self, extra: float) -> bool:
        """True when spending ``extra`` more now keeps the running average within budget:
        (spent + extra) / (n + 1) ≤ B (the strict test audits and fallbacks pass), with the
        requests other threads have in flight counted as spent (:class:`InFlight`)."""
        if self.budget is None:
            return True
        n_other, j_other = self.others()   # requests in flight in other threads count as spent
        return (self.spent + j_other + extra) / (self.n + n_other + 1) <= self.budget + 1e-12

    def price(self, atp: float) -> float:
        """λ · ATP / B, the cost term in value − λ·ATP/B (ATP normalised by the budget); ∞ for a
        call that costs anything under a zero budget, 0 without a budget."""
        if self.budget is None:
            return 0.0
        if self.budget == 0:
            return math.inf if atp > 0 else 0.0
        return self.lam * atp / self.budget

    # ---- what this controller adds ---------------------------------------------------
    @property
    def bank(self) -> float:
        """B·n − spent, J: what the run has saved so far (negative: overspent); 0 without a budget."""
        return 0.0 if self.budget is None else self.budget * self.n - self.spent

    def target(self) -> float:
        """ρ = B + bank/min(H, n + 10), clipped to [ρ_min·B, ρ_max·B]: the spending rate λ is solved
        for, J/request (a young run settles its bank over about as many requests as it has had)."""
        if not self.budget:
            return 0.0
        lo, hi = self.rate_bounds
        h = min(self.horizon, self.n + 10)
        return min(hi * self.budget, max(lo * self.budget, self.budget + self.bank / h))

    def headroom(self) -> float | None:
        """J one more request may cost so the running average stays within cap·B (plus the
        credit): cap·B·(n + 1) + credit·B − spent, other threads' requests in flight counted as
        spent (:class:`InFlight`). None without a budget."""
        if self.budget is None:
            return None
        n_other, j_other = self.others()   # requests in flight in other threads count as spent
        return self.cap * self.budget * (self.n + n_other + 1) + self.credit * self.budget - self.spent - j_other

    def observe(self, values, atps) -> None:
        """Keep one routed request's menu: the value (expected success, as the policy drew it:
        Thompson draw plus exploration bonus, the rule it decides by) and the expected ATP (J) of
        each candidate it had, two sequences of the same length ≥ 1. Raises ValueError otherwise."""
        v = np.asarray(values, dtype=np.float64)
        a = np.asarray(atps, dtype=np.float64)
        if v.shape != a.shape or v.ndim != 1 or len(v) == 0:
            raise ValueError(f"a menu needs equal-length 1-d values and ATPs, got {v.shape} and {a.shape}")
        if len(v) > self._V.shape[1]:  # more candidates than before: widen the buffers
            extra = len(v) - self._V.shape[1]
            self._V = np.hstack([self._V, np.full((self.window, extra), -np.inf)])
            self._A = np.hstack([self._A, np.zeros((self.window, extra))])
        slot = self._count % self.window
        self._V[slot] = -np.inf
        self._A[slot] = 0.0
        self._V[slot, :len(v)] = v
        self._A[slot, :len(a)] = a
        self._count += 1
        if self.budget and self._count == self.min_menus:
            self.refit()

    @property
    def menus(self) -> int:
        """Menus in the window now."""
        return min(self._count, self.window)

    def refit(self) -> float:
        """Re-solve λ from the window's menus for the target rate (module docstring); returns it."""
        self._since_fit = 0
        m = self.menus
        if not self.budget or m < self.min_menus:
            return self.lam
        slots = (self._count - m + np.arange(m)) % self.window  # oldest first
        weights = np.exp2(-(m - 1 - np.arange(m)) / self.half_life)
        self.lam = solve_arrays(self._V[slots], self._A[slots], self.target(), self.budget, self.lam_floor,
                                self.LAMBDA_MAX, weights=weights)
        return self.lam


def _stack(menus: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Menus padded to one (M, C) array of values (−inf padding) and of ATPs (0 padding)."""
    width = max(len(v) for v, _ in menus)
    V = np.full((len(menus), width), -np.inf)
    A = np.zeros((len(menus), width))
    for i, (v, a) in enumerate(menus):
        V[i, :len(v)] = v
        A[i, :len(a)] = a
    return V, A


def menu_spend(V: np.ndarray, A: np.ndarray, lam: float, budget: float, weights: np.ndarray | None = None) -> float:
    """(Weighted) mean ATP of each menu's choice at price λ: argmax_c V − λ·A/B, ties to the cheaper
    candidate. V, A: (M, C) arrays (values, J); weights: (M,) or None; returns J per request."""
    score = V - (lam / budget) * A - 1e-9 * A
    pick = np.argmax(score, axis=1)
    chosen = A[np.arange(len(A)), pick]
    return float(chosen.mean() if weights is None else (chosen * weights).sum() / weights.sum())


def solve_price(menus: list[tuple[np.ndarray, np.ndarray]], rho: float, budget: float,
                lam_min: float = 1e-4, lam_max: float = 1e4, iters: int = 40,
                weights: np.ndarray | None = None) -> float:
    """The smallest λ in [lam_min, lam_max] at which the menus spend at most ``rho`` J per request,
    each menu weighted by ``weights`` (None: equally); bisection on log λ (the spend is
    non-increasing in λ). lam_min when even that spends within ρ; lam_max when nothing does."""
    V, A = _stack(menus)
    return solve_arrays(V, A, rho, budget, lam_min, lam_max, iters, weights)


def solve_arrays(V: np.ndarray, A: np.ndarray, rho: float, budget: float, lam_min: float = 1e-4,
                 lam_max: float = 1e4, iters: int = 40, weights: np.ndarray | None = None) -> float:
    """:func:`solve_price` on menus already stacked: V, A (M, C) values (−inf where a menu has no
    candidate) and ATPs (J)."""
    if menu_spend(V, A, lam_min, budget, weights) <= rho:
        return lam_min
    if menu_spend(V, A, lam_max, budget, weights) > rho:
        return lam_max
    lo, hi = math.log(lam_min), math.log(lam_max)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if menu_spend(V, A, math.exp(mid), budget, weights) <= rho:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def make_pacer(budget: float | None, config):
    """The pacer a :class:`~dreamroute.config.RouterConfig` asks for: a :class:`SpendController`
    (``pacer: spend``, the default) or the earlier :class:`~dreamroute.router.dual_pacer.BudgetPacer`
    (``pacer: dual``). Raises ConfigError for a negative budget."""
    if config.pacer == "dual":
        from .dual_pacer import BudgetPacer
        return BudgetPacer(budget, config.lambda_rate, config.lambda_init, config.pacing_horizon)
    return SpendController(budget, lam0=config.lambda_init, window=config.pacing_window,
                           horizon=config.pacing_bank_horizon, cap=config.pacing_cap, credit=config.pacing_credit,
                           smoothing=config.pacing_horizon, lam_floor=config.pacing_lambda_floor,
                           half_life=config.pacing_half_life)
