"""What every routing policy shares: the view it decides from, its protocol, and a base class.

Its own file because both the learned policy (:mod:`~dreamroute.router.policies`) and the
baselines (:mod:`~dreamroute.router.baselines`), and policies defined elsewhere (the oracle of
``dreamroute simulate``), build on it, and the engine needs only this to drive any of them.

Every policy implements ``route(request, view) -> Decision`` (commit to a
first tier before any model answers), ``escalate(decision, call, view)``
(cascade: the next tier, or None) and ``update(decision, answer, outcomes)``.
The engine runs the same loop for all of them, live or replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .dual_pacer import BudgetPacer
from .memory import Memory, Neighbourhood
from .types import Answer, Call, Decision, Outcome, Request


@dataclass
class RouteView:
    """What a policy may look at when deciding: signals, neighbours, learned state, and the
    tiers ``available`` now (None: all; a tier whose backend failed cools down, and policies
    do not choose it meanwhile: see ``router.cooldown``)."""

    signals: object
    hood: Neighbourhood
    memory: Memory
    pacer: BudgetPacer
    prompt_chars: int
    prompt: str = ""
    available: list[str] | None = None
    lam_scale: float = 1.0
    quality_floor: float | None = None

    def price(self, atp: float) -> float:
        """The pacer's price of ``atp`` J, scaled by the metabolic state (FOCUS lowers λ for a
        salient request: ``lam_scale`` < 1)."""
        return self.pacer.price(atp) * self.lam_scale


class Policy(Protocol):
    """The protocol the engine drives: ``route``, ``escalate`` and ``update`` (module docstring)."""

    name: str
    audits: bool

    def route(self, request: Request, view: RouteView) -> Decision: ...

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None: ...

    def update(self, decision: Decision, answer: Answer, outcomes: list[Outcome]) -> None: ...


class BasePolicy:
    """What the policies share: their tiers and seeded RNG, the tiers available now, a
    :class:`~dreamroute.router.types.Decision` in their name, and no escalation or learning
    unless they add it."""

    audits = False
    needs_surprise = False

    def __init__(self, tiers: list[str], seed: int = 0):
        self.tiers = list(tiers)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def _available(self, view: RouteView) -> list[str]:
        """The tiers the policy may choose now (all but those cooling down; never empty)."""
        return [t for t in self.tiers if view.available is None or t in view.available] or self.tiers

    def _up(self, tier: str, view: RouteView) -> str | None:
        """The nearest available tier above ``tier``, or None."""
        avail = self._available(view)
        return next((t for t in self.tiers[self.tiers.index(tier) + 1:] if t in avail), None)

    def _decision(self, request: Request, view: RouteView, tier: str, **kw) -> Decision:
        return Decision(request_id=request.request_id, policy=self.name, tier=tier, signals=view.signals,
                        lam=view.pacer.lam, **kw)

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None:
        return None

    def update(self, decision: Decision, answer: Answer, outcomes: list[Outcome]) -> None:
        return None

