"""The router's learned state, rebuilt from the store at start.

Constructors store parameters; everything learned lives here: the experience
index, trust per (model version, context), surprise statistics, the
confidence → success calibration of each tier, and budget pacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..atp import TierCost
from ..config import RouterConfig
from ..signals import ExperienceIndex, FeatureEncoder, SurpriseStats, top_k
from ..trust import TrustBook, TrustState

CONF_BINS = 5
OUTCOME_VALUE = {"success": 1.0, "failure": 0.0}


@dataclass
class TierStats:
    """Running per-tier averages used for expected ATP (tokens per char, completion tokens)."""

    chars: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    n: int = 0

    def add(self, chars: int, prompt_tokens: int, completion_tokens: int) -> None:
        self.chars += chars
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.n += 1

    def tokens_per_char(self) -> float:
        return self.prompt_tokens / self.chars if self.chars > 0 else 0.3

    def mean_completion(self, default: float) -> float:
        return self.completion_tokens / self.n if self.n else default


class ConfidenceCalibration:
    """P(success | tier, confidence bin), learned from outcomes of answered calls.

    Confidence in [0, 1] is cut into ``CONF_BINS`` equal bins; each holds
    success and trial counts. ``estimate`` shrinks a bin's rate toward a prior
    p with ``weight`` pseudo-observations: (s + w·p) / (n + w).
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

    def estimate(self, tier: int, confidence: float | None, prior: float, weight: float = 5.0) -> float:
        b = self.bin(confidence)
        return float((self.success[tier, b] + weight * prior) / (self.trials[tier, b] + weight))


class BudgetPacer:
    """Budget-paced λ: a dual (Lagrange multiplier) update so the running
    average ATP per request follows the budget B.

    λ ← max(0, λ + η (a_t / B − 1)) after each request that spent a_t joules
    (online dual subgradient pacing, e.g. Balseiro & Gur, "Learning in
    repeated auctions with budgets", 2019). Without a budget λ stays 0.
    """

    def __init__(self, budget: float | None, rate: float, lam0: float = 0.0):
        self.budget = budget
        self.rate = rate
        self.lam = lam0 if budget else 0.0
        self.spent = 0.0
        self.n = 0

    def update(self, atp: float) -> None:
        self.spent += atp
        self.n += 1
        if self.budget:
            self.lam = max(0.0, self.lam + self.rate * (atp / self.budget - 1.0))

    @property
    def average(self) -> float:
        return self.spent / self.n if self.n else 0.0

    def allows(self, extra: float) -> bool:
        """True when spending ``extra`` more now keeps the running average within budget."""
        if not self.budget:
            return True
        return (self.spent + extra) / (self.n + 1) <= self.budget

    def price(self, atp: float) -> float:
        """λ · ATP / B, the cost term in p̂ − λ·ATP (ATP normalised by the budget)."""
        return self.lam * atp / self.budget if self.budget else 0.0


@dataclass
class Neighbourhood:
    """The k nearest experiences of a request: overall and per tier."""

    sims: np.ndarray
    rows_all: np.ndarray
    rows_by_tier: list[np.ndarray]


class Memory:
    """Learned state shared by every policy.

    Args:
        tiers: tier names, cheapest first.
        config: router settings.
        costs: ATP model per tier.
    """

    def __init__(self, tiers: list[str], config: RouterConfig, costs: dict[str, TierCost]):
        self.tiers = list(tiers)
        self.tier_index = {t: i for i, t in enumerate(self.tiers)}
        self.config = config
        self.costs = dict(costs)
        self.encoder = FeatureEncoder()
        self.index = ExperienceIndex(self.encoder.n_features)
        self.trust = TrustBook((config.prior_alpha, config.prior_beta), config.forgetting)
        self.surprise = {t: SurpriseStats() for t in self.tiers}
        self.tier_stats = {t: TierStats() for t in self.tiers}
        self.calibration = ConfidenceCalibration(len(self.tiers))
        self.versions: dict[str, int] = {}
        self.conversations: dict[str, sp.csr_matrix] = {}
        self.exp_rows: dict[int, int] = {}

    # ---- building -------------------------------------------------------------------
    def load(self, store, versions: dict[str, int]) -> None:
        """Rebuild from the store: trust rows and the experiences of the active versions."""
        self.versions = dict(versions)
        by_version = {v: t for t, v in versions.items()}
        for row in store.trust_table():
            if row.model_version_id in by_version:
                self.trust.set(row.model_version_id, row.context, TrustState(row.alpha, row.beta, row.count))
        cols = ["id", "prompt", "tier", "model_version_id", "outcome", "prompt_tokens", "completion_tokens",
                "confidence", "surprise", "role"]
        rows = [r for r in store.experiences(cols) if r["model_version_id"] in by_version]
        if not rows:
            return
        vecs = self.encoder.encode_many([r["prompt"] for r in rows])
        tiers = [self.tier_index[by_version[r["model_version_id"]]] for r in rows]
        outcomes = [OUTCOME_VALUE.get(r["outcome"], math.nan) for r in rows]
        self.index.add_many(vecs, tiers, outcomes, [r["completion_tokens"] for r in rows], [r["id"] for r in rows])
        for i, r in enumerate(rows):
            self.exp_rows[r["id"]] = i
            tier = by_version[r["model_version_id"]]
            self.tier_stats[tier].add(len(r["prompt"]), r["prompt_tokens"], r["completion_tokens"])
            if r["role"] != "audit" and r["outcome"] in OUTCOME_VALUE:
                self.calibration.add(self.tier_index[tier], r["confidence"], OUTCOME_VALUE[r["outcome"]])
            if r["surprise"] is not None and tier == self.tiers[0]:
                self.surprise[tier].add(r["surprise"])

    # ---- querying -------------------------------------------------------------------
    def neighbourhood(self, vec: sp.csr_matrix) -> Neighbourhood:
        """k nearest experiences with a known outcome, overall and per tier."""
        k = self.config.k
        sims = self.index.similarities(vec)
        known = ~np.isnan(self.index.outcome) if len(sims) else np.zeros(0, bool)
        rows_all = top_k(sims, known, k) if len(sims) else np.zeros(0, int)
        by_tier = []
        for i in range(len(self.tiers)):
            mask = known & (self.index.tier == i) if len(sims) else known
            by_tier.append(top_k(sims, mask, k) if len(sims) else np.zeros(0, int))
        return Neighbourhood(sims, rows_all, by_tier)

    def neighbour_counts(self, hood: Neighbourhood, tier: str) -> tuple[float, int]:
        """(successes, trials) among the tier's k nearest experiences."""
        rows = hood.rows_by_tier[self.tier_index[tier]]
        if len(rows) == 0:
            return 0.0, 0
        return float(self.index.outcome[rows].sum()), int(len(rows))

    def expected_completion(self, hood: Neighbourhood, tier: str, default: float) -> float:
        rows = hood.rows_by_tier[self.tier_index[tier]]
        if len(rows):
            return float(self.index.completion_tokens[rows].mean())
        return self.tier_stats[tier].mean_completion(default)

    def expected_atp(self, hood: Neighbourhood, tier: str, prompt_chars: int, max_tokens: int) -> float:
        """Expected ATP of calling ``tier`` (J): estimated prompt tokens and the neighbours' completion length."""
        stats = self.tier_stats[tier]
        prompt_tokens = prompt_chars * stats.tokens_per_char() + 12
        completion = min(max_tokens, self.expected_completion(hood, tier, 0.75 * max_tokens))
        return self.costs[tier].joules(int(prompt_tokens), int(completion))

    def trust_state(self, tier: str, context: str) -> TrustState:
        return self.trust.get(self.versions[tier], context)
