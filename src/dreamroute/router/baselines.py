"""The baseline policies: one fixed tier, a random tier, and a confidence-threshold cascade.

Its own file because these are the yardsticks the learned policy
(:class:`~dreamroute.router.policies.DreamroutePolicy`) is measured against, and the engine's
pinned requests (``always:TIER``) use one; none of them learns anything.

- ``always:TIER``: one tier for everything.
- ``random``: a uniformly random tier, or with ``random:P`` the top tier with
  probability P and the cheapest otherwise (RouteLLM's random router).
- ``cascade``: cheapest first, escalate while confidence < threshold
  (FrugalGPT, Chen et al. 2023; AutoMix, Madaan et al. 2023), ``cascade:T``.
"""

from __future__ import annotations

from ..errors import ConfigError, UnknownTierError
from .policy_base import RouteView, BasePolicy
from .types import Call, Decision, Request


class AlwaysPolicy(BasePolicy):
    """Send every request to one tier (while it cools down, the engine's fallback answers)."""

    def __init__(self, tiers: list[str], tier: str, seed: int = 0):
        super().__init__(tiers, seed)
        if tier not in tiers:
            raise UnknownTierError(tier, tiers)
        self.tier = tier
        self.name = f"always:{tier}"

    def route(self, request: Request, view: RouteView) -> Decision:
        return self._decision(request, view, self.tier)


class RandomPolicy(BasePolicy):
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


class CascadePolicy(BasePolicy):
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

