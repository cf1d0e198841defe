"""Trust: the mean of a Beta(α, β) posterior over P(success) with forgetting.

A model version's trust in a context is a Beta posterior. Before each update
the posterior is pulled toward the prior (DESIGN.md):

    α, β ← 1 + γ(α − 1), 1 + γ(β − 1)
    α ← α + r,  β ← β + (1 − r)

with r ∈ [0, 1] the reward (1 success, 0 failure, or a rating). This is the
discounted Beta-Bernoulli bandit of Raj & Kalyani, "Taming non-stationary
bandits: a Bayesian approach" (2017), with the prior Beta(1, 1); γ = 1 means
no forgetting. Thompson sampling (Thompson 1933; Chapelle & Li 2011) draws
θ ~ Beta(α, β).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def forget(alpha: float, beta: float, gamma: float, prior: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """Decay a Beta(α, β) toward the prior by factor γ ∈ (0, 1].

    Returns (α', β') with α' = a0 + γ(α − a0), β' = b0 + γ(β − b0).
    Raises ValueError if γ is outside (0, 1].
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"forgetting factor must be in (0, 1], got {gamma}")
    a0, b0 = prior
    return a0 + gamma * (alpha - a0), b0 + gamma * (beta - b0)


def update(alpha: float, beta: float, reward: float, gamma: float,
           prior: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """One observation: forget, then add reward r ∈ [0, 1] to α and 1 − r to β.

    Raises ValueError if r is outside [0, 1].
    """
    if not 0.0 <= reward <= 1.0:
        raise ValueError(f"reward must be in [0, 1], got {reward}")
    a, b = forget(alpha, beta, gamma, prior)
    return a + reward, b + (1.0 - reward)


def mean(alpha: float, beta: float) -> float:
    """Posterior mean α / (α + β), the trust value."""
    return alpha / (alpha + beta)


@dataclass
class TrustState:
    """Beta posterior of one (model version, context): α, β and raw observation count."""

    alpha: float = 1.0
    beta: float = 1.0
    count: int = 0

    @property
    def mean(self) -> float:
        return mean(self.alpha, self.beta)

    def sample(self, rng: np.random.Generator) -> float:
        """A Thompson draw θ ~ Beta(α, β)."""
        return float(rng.beta(self.alpha, self.beta))


class TrustBook:
    """In-memory trust per (model version id, context), mirrored in the store.

    Args:
        prior: (α0, β0) of a fresh posterior.
        gamma: forgetting factor γ.
    """

    def __init__(self, prior: tuple[float, float] = (1.0, 1.0), gamma: float = 0.995):
        self.prior = prior
        self.gamma = gamma
        self._states: dict[tuple[int, str], TrustState] = {}

    def get(self, version_id: int, context: str) -> TrustState:
        """The posterior (the prior if never observed); never None."""
        st = self._states.get((version_id, context))
        return st if st is not None else TrustState(*self.prior, 0)

    def set(self, version_id: int, context: str, state: TrustState) -> None:
        self._states[(version_id, context)] = state

    def observe(self, version_id: int, context: str, reward: float) -> tuple[TrustState, TrustState]:
        """Apply one reward; returns (before, after)."""
        before = self.get(version_id, context)
        a, b = update(before.alpha, before.beta, reward, self.gamma, self.prior)
        after = TrustState(a, b, before.count + 1)
        self._states[(version_id, context)] = after
        return before, after

    def items(self):
        return self._states.items()
