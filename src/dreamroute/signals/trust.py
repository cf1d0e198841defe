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


def replace_reward(alpha: float, beta: float, old: float, new: float, weight: float,
                   prior: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """Rewrite one past observation's reward from ``old`` to ``new`` (a changed verdict).

    With x = α − α0 and y = β − β0 the update above is linear, x ← γx + r and
    y ← γy + (1 − r), so after T updates x = Σ_t γ^(T−t) r_t and
    y = Σ_t γ^(T−t) (1 − r_t): an observation made d updates ago weighs
    ``weight`` = γ^d now. Replacing its reward changes only its own term:

        α' = α + w (new − old),  β' = β + w (old − new)

    which is exactly the posterior that ``new`` in place of ``old`` (at the same
    position in the sequence) would have given; no forgetting step is applied
    (it is not a new observation). The result is clipped at the prior (float
    rounding, or a history the slot does not belong to, must not push α or β
    below it).

    Raises ValueError if a reward is outside [0, 1] or the weight outside [0, 1].
    """
    for r in (old, new):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"reward must be in [0, 1], got {r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1] (γ^d), got {weight}")
    a0, b0 = prior
    return max(a0, alpha + weight * (new - old)), max(b0, beta + weight * (old - new))


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
        before, after = self.preview(version_id, context, reward)
        self._states[(version_id, context)] = after
        return before, after

    def preview(self, version_id: int, context: str, reward: float,
                before: TrustState | None = None) -> tuple[TrustState, TrustState]:
        """What :meth:`observe` would return, changing nothing: (before, after) of one reward, from
        ``before`` (default the posterior held now). Raises ValueError as :func:`update`."""
        if before is None:
            before = self.get(version_id, context)
        a, b = update(before.alpha, before.beta, reward, self.gamma, self.prior)
        return before, TrustState(a, b, before.count + 1)

    def set_written(self, updates) -> None:
        """Set each updated (version, context) to what the store wrote: ``TrustUpdate``s after
        ``Store.record`` / ``record_outcome`` hold the row as the database has it (computed there
        under the row's lock, so other routers' updates are included)."""
        for u in updates:
            self._states[(u.model_version_id, u.context)] = TrustState(u.alpha_after, u.beta_after, u.count_after)

    def known(self, version_id: int, context: str) -> bool:
        """Whether (version, context) has a posterior here (observed, or set from the store)."""
        return (version_id, context) in self._states

    def replace(self, version_id: int, context: str, old: float, new: float,
                steps: float) -> tuple[TrustState, TrustState]:
        """A changed verdict: the observation made ``steps`` updates ago had reward ``old``, now
        ``new`` (:func:`replace_reward` with weight γ^steps). The count is unchanged (it is
        the same observation). Returns (before, after)."""
        before = self.get(version_id, context)
        w = self.gamma ** max(0.0, float(steps))
        a, b = replace_reward(before.alpha, before.beta, old, new, w, self.prior)
        after = TrustState(a, b, before.count)
        self._states[(version_id, context)] = after
        return before, after

    def items(self):
        return self._states.items()
