"""Metabolic states: what the hierarchy may spend and do, decided from measured signals.

DESIGN.md's five states, and what each one changes:

* ``WAKE``: normal routing.
* ``FOCUS``: recent requests are salient (mean pre-answer SNARC salience of the
  last ``focus_window`` requests ≥ ``focus_enter``) and the period's budget has
  room (≥ ``focus_min_budget`` left): a high-salience request (salience ≥
  ``focus_enter``) gets a higher quality target (only tiers with p̂ ≥
  ``focus_quality_target`` are chosen, unless none reaches it) and a cheaper ATP
  price (λ × ``focus_lambda_scale``). Back to WAKE below
  ``focus_exit`` or when the budget runs low.
* ``REST``: no request has run for ``rest_after_s``: the tiers above the
  ``keep_loaded`` cheapest are unloaded (their memory freed); a request that
  needs one reloads it (and wakes the hierarchy).
* ``DREAM``: resting for ``dream_after_s`` with a DREAM backlog (witnessed
  teacher successes since the last cycle) of at least ``dream_min_backlog``: a
  consolidation cycle runs in a separate process; requests are still served
  (the hierarchy wakes, the cycle goes on). When it ends, promoted versions are
  loaded and the state returns to REST.
* ``CRISIS``: set explicitly (``set_crisis``) or by a request whose priority is
  ≥ ``crisis_priority``: every request goes to the top tier regardless of
  budget, for ``crisis_hold_s`` after the last such request (or until cleared).

The controller only decides; whoever owns the models acts on the returned
:class:`Action` values (the server: unload a tier holding its gate, start the
cycle process). It holds no models and no store, and takes time from ``clock``
(seconds), so tests drive it with a fake clock.

Idle time is counted from the end of the last request, and REST and DREAM never start
while one runs: the owner brackets each request with :meth:`begin_request` and
:meth:`end_request` (the server does, from its arrival, waiting for the engine
included, to its answer or error), and :meth:`tick` does not rest or dream while any
is in flight.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Callable

from dreamroute.config.metabolic import MetabolicConfig


class State(str, Enum):
    """The metabolic states (DESIGN.md)."""

    WAKE = "WAKE"
    FOCUS = "FOCUS"
    REST = "REST"
    DREAM = "DREAM"
    CRISIS = "CRISIS"


@dataclass(frozen=True)
class Knobs:
    """What the state changes for one request: a forced tier (CRISIS), a λ multiplier and a
    quality-target floor (FOCUS)."""

    state: State
    force_tier: str | None = None
    lam_scale: float = 1.0
    quality_floor: float | None = None


@dataclass(frozen=True)
class Action:
    """Something the owner of the models must do: ``unload`` (tiers), ``dream`` (start a
    cycle) or ``reload`` (a cycle ended: load the active versions)."""

    kind: str
    tiers: tuple[str, ...] = ()


@dataclass
class Transition:
    """One state change: when (unix seconds), from, to, why, and the signals that decided it."""

    at: float
    source: str
    target: str
    reason: str
    signals: dict = field(default_factory=dict)


class MetabolicController:
    """Decides the metabolic state from measured signals (see the module docstring).

    Args:
        config: :class:`MetabolicConfig`.
        tiers: tier names, cheapest first.
        clock: seconds (``time.time`` by default; tests pass a fake clock).

    Feed it :meth:`on_request` (before routing, with the request's pre-answer
    salience and priority), :meth:`on_answer` (the ATP the request spent),
    :meth:`on_background` (ATP spent while idle) and call :meth:`tick` every few
    seconds with the DREAM backlog; act on the actions it returns.
    """

    def __init__(self, config: MetabolicConfig, tiers: list[str], *, clock: Callable[[], float] = time.time):
        if not tiers:
            raise ValueError("the metabolic controller needs at least one tier")
        self.config, self.tiers, self.clock = config, list(tiers), clock
        now = clock()
        self.state = State.WAKE
        self.since = now
        self.last_activity = now
        self.history: deque[Transition] = deque(maxlen=config.history)
        self.salience: deque[float] = deque(maxlen=config.focus_window)
        self.spent: deque[tuple[float, float]] = deque()
        self.crisis_flag = False
        self.crisis_until = 0.0
        self.dreaming = False
        self.unloaded: tuple[str, ...] = ()
        self.backlog = 0
        self.in_flight = 0

    # ------------------------------------------------------------------ signals
    def spent_in_period(self) -> float:
        """ATP spent over the last ``period_s`` seconds, J."""
        cutoff = self.clock() - self.config.period_s
        while self.spent and self.spent[0][0] < cutoff:
            self.spent.popleft()
        return sum(j for _, j in self.spent)

    def budget_left(self) -> float:
        """Fraction of the period's budget not yet spent, in [0, 1] (1 with no period budget)."""
        b = self.config.period_budget_j
        if b is None:
            return 1.0
        return 0.0 if b == 0 else max(0.0, 1.0 - self.spent_in_period() / b)

    def mean_salience(self) -> float:
        """Mean pre-answer salience of the last ``focus_window`` requests (0 with none)."""
        return sum(self.salience) / len(self.salience) if self.salience else 0.0

    def idle_s(self) -> float:
        """Seconds since the last request ended (or since it began, without ``end_request``);
        0.0 while one is in flight."""
        if self.in_flight:
            return 0.0
        return max(0.0, self.clock() - self.last_activity)

    def signals(self) -> dict:
        """The measured signals transitions are decided on."""
        return {"budget_left": round(self.budget_left(), 4), "spent_in_period_j": round(self.spent_in_period(), 3),
                "idle_s": round(self.idle_s(), 3), "mean_salience": round(self.mean_salience(), 4),
                "dream_backlog": self.backlog, "dreaming": self.dreaming, "crisis_flag": self.crisis_flag,
                "in_flight": self.in_flight}

    def _go(self, target: State, reason: str) -> None:
        if target is self.state:
            return
        now = self.clock()
        self.history.append(Transition(now, self.state.value, target.value, reason, self.signals()))
        self.state, self.since = target, now

    # ------------------------------------------------------------------ requests
    def begin_request(self) -> None:
        """A request has arrived (it may wait for the models): no REST or DREAM starts until it ends."""
        self.in_flight += 1
        self.last_activity = self.clock()

    def end_request(self) -> None:
        """A request begun with :meth:`begin_request` ended (answered or failed): idle time counts
        from now."""
        self.in_flight = max(0, self.in_flight - 1)
        self.last_activity = self.clock()

    def on_request(self, priority: float, salience: float) -> Knobs:
        """A request is about to be routed: returns its :class:`Knobs`.

        Args:
            priority: the request's priority in [0, 1].
            salience: its pre-answer SNARC salience in [0, 1] (surprise, novelty, priority).
        """
        cfg, now = self.config, self.clock()
        self.last_activity = now
        if not cfg.enabled:
            return Knobs(State.WAKE)
        self.salience.append(float(salience))
        if priority >= cfg.crisis_priority:
            self.crisis_until = now + cfg.crisis_hold_s
            self._go(State.CRISIS, f"request priority {priority:.2f} >= {cfg.crisis_priority:.2f}")
        elif self.state in (State.REST, State.DREAM):
            self._go(State.WAKE, "a request arrived" + (" (the DREAM cycle goes on)" if self.dreaming else ""))
        if self.state is State.CRISIS:
            return Knobs(State.CRISIS, force_tier=self.tiers[-1])
        self._update_focus()
        if self.state is State.FOCUS and salience >= cfg.focus_enter:
            return Knobs(State.FOCUS, lam_scale=cfg.focus_lambda_scale, quality_floor=cfg.focus_quality_target)
        return Knobs(self.state)

    def on_answer(self, atp: float) -> None:
        """The request was answered, spending ``atp`` J (all calls)."""
        now = self.clock()
        self.last_activity = now
        self.spent.append((now, float(atp)))
        if self.config.enabled and self.state in (State.WAKE, State.FOCUS):
            self._update_focus()

    def on_background(self, atp: float) -> None:
        """ATP spent by idle-time work (warm handoffs, a DREAM cycle), J: counts against the period."""
        self.spent.append((self.clock(), float(atp)))

    def _update_focus(self) -> None:
        cfg = self.config
        sal, left = self.mean_salience(), self.budget_left()
        if self.state is State.WAKE and len(self.salience) >= min(cfg.focus_window, 5) \
                and sal >= cfg.focus_enter and left >= cfg.focus_min_budget:
            self._go(State.FOCUS, f"mean salience {sal:.2f} >= {cfg.focus_enter:.2f}, {100 * left:.0f}% of budget left")
        elif self.state is State.FOCUS and (sal < cfg.focus_exit or left < cfg.focus_min_budget):
            why = (f"mean salience {sal:.2f} < {cfg.focus_exit:.2f}" if sal < cfg.focus_exit
                   else f"{100 * left:.0f}% of budget left < {100 * cfg.focus_min_budget:.0f}%")
            self._go(State.WAKE, why)

    # ------------------------------------------------------------------ explicit crisis
    def set_crisis(self, on: bool) -> None:
        """Start (until cleared) or clear CRISIS."""
        self.crisis_flag = bool(on)
        if on:
            self._go(State.CRISIS, "crisis flag set")
        elif self.state is State.CRISIS:
            self.crisis_until = 0.0
            self._go(State.WAKE, "crisis flag cleared")

    # ------------------------------------------------------------------ time passing
    def tick(self, backlog: int = 0) -> list[Action]:
        """Advance on time: returns the actions to take now.

        Args:
            backlog: witnessed teacher successes not yet consolidated (DREAM backlog).
        """
        cfg, now = self.config, self.clock()
        self.backlog = int(backlog)
        if not cfg.enabled:
            return []
        actions: list[Action] = []
        if self.state is State.CRISIS and not self.crisis_flag and now >= self.crisis_until:
            self._go(State.WAKE, f"no crisis request for {cfg.crisis_hold_s:.0f} s")
        if self.in_flight:
            return actions   # never rest or dream while a request runs
        idle = self.idle_s()
        if self.state in (State.WAKE, State.FOCUS) and idle >= cfg.rest_after_s:
            self._go(State.REST, f"idle {idle:.0f} s >= {cfg.rest_after_s:.0f} s")
            drop = tuple(self.tiers[cfg.keep_loaded:])
            if drop:
                self.unloaded = drop
                actions.append(Action("unload", drop))
        if (self.state is State.REST and not self.dreaming and idle >= cfg.dream_after_s
                and self.backlog >= cfg.dream_min_backlog):
            self._go(State.DREAM, f"idle {idle:.0f} s, DREAM backlog {self.backlog} >= {cfg.dream_min_backlog}")
            self.dreaming = True
            actions.append(Action("dream"))
        return actions

    def cancel_dream(self, reason: str) -> None:
        """A ``dream`` action was not carried out (a request arrived before the cycle started):
        not dreaming, and back to WAKE from DREAM."""
        self.dreaming = False
        if self.state is State.DREAM:
            self._go(State.WAKE, reason)

    def dream_finished(self, promoted: bool) -> list[Action]:
        """The cycle process ended (promoted or not): back to REST (if still dreaming) and reload."""
        self.dreaming = False
        if self.state is State.DREAM:
            self._go(State.REST, "DREAM cycle ended" + (" with a promotion" if promoted else ""))
        return [Action("reload")] if promoted else []

    def snapshot(self) -> dict:
        """State, since when, the signals and the transition history (JSON-ready)."""
        return {"state": self.state.value, "since": self.since, "signals": self.signals(),
                "unloaded": list(self.unloaded) if self.state in (State.REST, State.DREAM) else [],
                "history": [asdict(t) for t in self.history]}
