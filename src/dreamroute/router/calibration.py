"""The confidence → success calibration of each tier, learned from graded outcomes.

Its own file because it is a self-contained estimator (binned counts and a naive-Bayes
odds update) with no knowledge of the rest of the learned state: :class:`~dreamroute.router.memory.Memory`
holds one and feeds it outcomes, and :class:`~dreamroute.router.policies.DreamroutePolicy`
reads its bins to price a cascade before a tier has a learned answer judge.
"""

from __future__ import annotations

import math

import numpy as np

CONF_BINS = 5


class ConfidenceCalibration:
    """How a tier's answer confidence predicts its success, learned from outcomes.

    Confidence in [0, 1] is cut into ``CONF_BINS`` equal bins (plus one for
    "no signal"); each bin counts successes and trials per tier. ``adjust``
    combines an item-level prior p (the tier's p̂ for this prompt) with the
    bin by Bayes' rule in odds form, assuming the bin and the prompt's
    neighbours are independent evidence (naive Bayes):

        logit P(success | x, c) = logit p̂(x) + logit P(success | c) − logit P(success)

    with Laplace-smoothed rates. A bin with no observations leaves p̂ unchanged.
    """

    def __init__(self, n_tiers: int):
        self.success = np.zeros((n_tiers, CONF_BINS + 1))
        self.trials = np.zeros((n_tiers, CONF_BINS + 1))

    @staticmethod
    def bin(confidence: float | None) -> int:
        if confidence is None or not math.isfinite(confidence):
            return CONF_BINS  # the "no signal" bin
        return min(CONF_BINS - 1, max(0, int(confidence * CONF_BINS)))

    def add(self, tier: int, confidence: float | None, outcome: float) -> None:
        b = self.bin(confidence)
        self.trials[tier, b] += 1
        self.success[tier, b] += outcome

    def adjust(self, tier: int, confidence: float | None, prior: float) -> float:
        return self.adjust_bin(tier, self.bin(confidence), prior)

    def bin_distribution(self, tier: int) -> np.ndarray | None:
        """P(bin | tier) over the bins seen so far (Laplace-smoothed over them), or None before any."""
        seen = self.trials[tier] > 0
        if not seen.any():
            return None
        w = np.where(seen, self.trials[tier] + 1.0, 0.0)
        return w / w.sum()

    def adjust_bin(self, tier: int, b: int, prior: float) -> float:
        if self.trials[tier, b] == 0:
            return prior
        p_bin = (self.success[tier, b] + 1.0) / (self.trials[tier, b] + 2.0)
        p_all = (self.success[tier].sum() + 1.0) / (self.trials[tier].sum() + 2.0)
        p = min(1 - 1e-6, max(1e-6, prior))
        z = _logit(p) + _logit(p_bin) - _logit(p_all)
        return 1.0 / (1.0 + math.exp(-z))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))
