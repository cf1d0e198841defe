"""Routing policies behind one protocol.

Every policy implements ``route(request, view) -> Decision`` (commit to a
first tier before any model answers), ``escalate(decision, call, view)``
(cascade: the next tier, or None) and ``update(decision, answer, outcomes)``.
The engine runs the same loop for all of them, live or replayed.

- ``dreamroute``: p̂ − λ·ATP/B with Thompson sampling, learned cascade, audits.
- ``always:TIER``: one tier for everything.
- ``random``: a uniformly random tier, or with ``random:P`` the top tier with
  probability P and the cheapest otherwise (RouteLLM's random router).
- ``cascade``: cheapest first, escalate while confidence < threshold
  (FrugalGPT, Chen et al. 2023; AutoMix, Madaan et al. 2023), ``cascade:T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import ConfigError, UnknownTierError
from .memory import BudgetPacer, Memory, Neighbourhood
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
    name: str
    audits: bool

    def route(self, request: Request, view: RouteView) -> Decision: ...

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None: ...

    def update(self, decision: Decision, answer: Answer, outcomes: list[Outcome]) -> None: ...


class _Base:
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


class AlwaysPolicy(_Base):
    """Send every request to one tier (while it cools down, the engine's fallback answers)."""

    def __init__(self, tiers: list[str], tier: str, seed: int = 0):
        super().__init__(tiers, seed)
        if tier not in tiers:
            raise UnknownTierError(tier, tiers)
        self.tier = tier
        self.name = f"always:{tier}"

    def route(self, request: Request, view: RouteView) -> Decision:
        return self._decision(request, view, self.tier)


class RandomPolicy(_Base):
    """A random tier: uniform, or the top tier with probability ``p_top`` else the cheapest."""

    def __init__(self, tiers: list[str], p_top: float | None = None, seed: int = 0):
        super().__init__(tiers, seed)
        if p_top is not None and not 0.0 <= p_top <= 1.0:
            raise ConfigError(f"random:P needs P in [0, 1], got {p_top}")
        self.p_top = p_top
        self.name = "random" if p_top is None else f"random:{p_top:g}"

    def route(self, request: Request, view: RouteView) -> Decision:
        avail = self._available(view)
        if self.p_top is None:
            tier = avail[int(self.rng.integers(len(avail)))]
        else:
            tier = avail[-1] if self.rng.random() < self.p_top else avail[0]
        return self._decision(request, view, tier)


class CascadePolicy(_Base):
    """Cheapest tier first; escalate one tier up while confidence < ``threshold``.

    A response with no confidence signal (no logprobs, no answer form) is not escalated.
    """

    def __init__(self, tiers: list[str], threshold: float = 0.5, seed: int = 0):
        super().__init__(tiers, seed)
        self.threshold = threshold
        self.name = f"cascade:{threshold:g}"

    def route(self, request: Request, view: RouteView) -> Decision:
        return self._decision(request, view, self._available(view)[0])

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None:
        if call.confidence is not None and call.confidence < self.threshold:
            return self._up(call.tier, view)
        return None


class DreamroutePolicy(_Base):
    """The trust router (DESIGN.md steps 3–6).

    For each tier t: the neighbours give s_t successes in m_t trials among
    its k nearest direct experiences; the context trust Beta(α, β) over
    direct outcomes gives θ_t. Direct means decided before any answer was
    seen (first calls, audits): an escalation is observed only when a
    cheaper tier's answer looked wrong, a harder-than-typical sample that
    would bias p̂ down; it teaches the conditional answer judges instead. The
    posterior P(success | x, t) ~ Beta(1 + s_t + w·θ_t, 1 + m_t − s_t + w(1 − θ_t))
    with w = ``shrinkage`` pseudo-observations; p̂_t is its mean, and a
    Thompson draw of it (θ_t itself drawn from the trust posterior) is what
    the choice maximises, subject to the quality target: for the top tier
    draw − λ·ATP/B; for a lower tier the value of calling it first and
    escalating when its answer looks weak (:meth:`cascade_value`) minus its
    λ-priced ATP.

    Escalation (DESIGN.md step 5, with the threshold learned): after tier t
    answers a, P(success | x, t, a) combines p̂_t(x) with what the tier's
    graded answers taught: its learned answer judge
    (:class:`~dreamroute.router.judge.AnswerJudge`: the answer's form, length,
    logprobs ...), or before it has one, the outcomes of earlier answers in the
    same confidence bin (:class:`ConfidenceCalibration`); escalate when the next tier's p̂ exceeds it by more than the next
    call's λ-priced ATP (λ is what keeps the average within budget). The confidence below which
    a tier is escalated is thus learned per tier and moves with the budget.
    Audit: with probability a + b·n(x)², budget permitting: only while the
    budget does not bind (no budget, or spending has stayed under it long
    enough for λ to fall to its floor), so a binding budget is spent on
    answers, not on checks.
    """

    audits = True
    needs_surprise = True

    def __init__(self, tiers: list[str], config, seed: int = 0, quality_target: float | None = None):
        super().__init__(tiers, seed)
        self.config = config
        self.quality_target = quality_target if quality_target is not None else config.quality_target
        self.name = "dreamroute"

    def estimates(self, view: RouteView, sample: bool) -> dict[str, float]:
        w = self.config.shrinkage
        out = {}
        for t in self.tiers:
            st = view.memory.direct_trust_state(t, view.signals.context)
            theta = st.sample(self.rng) if sample else st.mean
            s, m = view.memory.neighbour_counts(view.hood, t)
            a, b = 1.0 + s + w * theta, 1.0 + (m - s) + w * (1.0 - theta)
            out[t] = float(self.rng.beta(a, b)) if sample else a / (a + b)
        return out

    def cascade_value(self, i: int, p_t: float, p_next: float, price_next: float, view: RouteView
                      ) -> tuple[float, float] | None:
        """Calling tier i first and escalating when its answer looks weak: (expected
        success, probability of escalating), or None before tier i has any graded answer.

        Expected success = E_a[max(P(success | x, i, a), P(next succeeds | x, a) − price_next)]
        over tier i's answers a (one-step lookahead, as in cascades that learn when to
        defer: FrugalGPT, Chen et al. 2023; AutoMix, Madaan et al. 2023). Once the tier
        has a learned answer judge, the expectation runs over its latest answers, each
        judged (and, with ``next_judge``, the next tier's chance given it), then combined
        with this item's p̂ (``p_t``, ``p_next``); before that, over its confidence bins b,
        Σ_b P(b | tier i) · max(P(success | x, i, b), p_next − price_next).
        """
        mem = view.memory
        if mem.judge.fitted(i):
            judged, q = mem.recent_judgements(i)
            p_a = mem.judge.combine(i, p_t, judged)
            alt = (mem.next_given(i, p_next, q) if q is not None else p_next) - price_next
            return float(np.maximum(p_a, alt).mean()), float((alt > p_a).mean())
        alternative = p_next - price_next
        cal = view.memory.calibration
        dist = cal.bin_distribution(i)
        if dist is None:
            return None
        value = escalate = 0.0
        for b, w in enumerate(dist):
            if w > 0:
                p_b = cal.adjust_bin(i, b, p_t)
                value += w * max(p_b, alternative)
                escalate += w * (alternative > p_b)
        return value, escalate

    def route(self, request: Request, view: RouteView) -> Decision:
        p_hat = self.estimates(view, sample=False)
        draw = self.estimates(view, sample=True)
        atp = {t: view.memory.expected_atp(view.hood, t, view.prompt_chars, request.max_tokens) for t in self.tiers}
        price = {t: view.price(atp[t]) for t in self.tiers}
        target = self.quality_target
        if request.priority >= 0.5 and target is not None:
            target = min(1.0, target + 0.1)
        if view.quality_floor is not None:  # FOCUS: a salient request gets a tier expected to manage it
            target = max(target or 0.0, view.quality_floor)
        avail = self._available(view)
        allowed = [t for t in avail if target is None or p_hat[t] >= target] or [max(avail, key=p_hat.get)]

        def best(est: dict[str, float]) -> str:
            # candidates: each allowed tier directly, and each lower tier as the first step of a
            # cascade; the higher value wins, then the lower expected ATP
            cands = [(est[t] - price[t], -atp[t], t) for t in allowed]
            for t in allowed:
                i = self.tiers.index(t)
                if i + 1 < len(self.tiers) and self.tiers[i + 1] in avail:
                    nxt = self.tiers[i + 1]
                    cv = self.cascade_value(i, est[t], est[nxt], price[nxt], view)
                    if cv is not None:
                        cands.append((cv[0] - price[t], -(atp[t] + cv[1] * atp[nxt]), t))
            return max(cands)[2]

        tier = best(draw)
        greedy = best(p_hat)
        n = view.signals.novelty
        p_audit = self.config.audit_base + self.config.audit_novelty * n * n
        up = self.tiers.index(tier) + 1
        audit = bool(up < len(self.tiers) and self.rng.random() < p_audit and not view.pacer.binding
                     and self.tiers[up] in avail)
        return self._decision(request, view, tier, p_hat=p_hat, expected_atp=atp, audit=audit,
                              explored=tier != greedy)

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None:
        nxt = self._up(call.tier, view)
        if nxt is None:
            return None
        p_now, p_next = view.memory.answer_success(call.tier, view.prompt, call, decision.p_hat.get(call.tier, 0.5),
                                                   decision.p_hat.get(nxt, 0.5))
        gain = p_next - p_now
        cost = decision.expected_atp.get(nxt, 0.0)
        if gain > view.price(cost):
            return nxt
        return None


def make_policy(spec: str, tiers: list[str], config, *, seed: int = 0) -> Policy:
    """Build a policy from its name: ``dreamroute``, ``always:TIER``, ``random[:P]``, ``cascade[:T]``.

    Raises ConfigError (unknown name, bad number) or UnknownTierError.
    """
    name, _, arg = spec.partition(":")
    try:
        if name == "dreamroute" and not arg:
            return DreamroutePolicy(tiers, config, seed=seed)
        if name == "always" and arg:
            return AlwaysPolicy(tiers, arg, seed=seed)
        if name == "random":
            return RandomPolicy(tiers, float(arg) if arg else None, seed=seed)
        if name == "cascade":
            t = float(arg) if arg else config.escalate_below
            if not 0.0 <= t <= 1.0:
                raise ConfigError(f"cascade:T needs a confidence threshold T in [0, 1], got {arg}; e.g. cascade:0.6")
            return CascadePolicy(tiers, t, seed=seed)
    except ValueError as e:
        raise ConfigError(f"policy {spec!r}: {e}; e.g. random:0.3 or cascade:0.6") from e
    raise ConfigError(f"unknown policy {spec!r}; use dreamroute, always:TIER ({', '.join(tiers)}), "
                      "random, random:P or cascade:T")
