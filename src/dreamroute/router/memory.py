"""The router's learned state, rebuilt from the store at start.

Constructors store parameters; everything learned lives here: the experience
index, trust per (model version, context), surprise statistics, the
confidence → success calibration (:mod:`~dreamroute.router.calibration`) and the
learned answer judge of each tier. Budget pacing is the pacer's
(:mod:`~dreamroute.router.pacing`, :mod:`~dreamroute.router.dual_pacer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..signals.atp import TierCost
from ..config import CONTEXTS, RouterConfig
from ..signals.features import SurpriseStats
from ..store.conversations import last_answer
from ..signals.trust import TrustBook, TrustState
from .calibration import ConfidenceCalibration
from .encoder import make_encoder
from .index import ExperienceIndex
from .judge import AnswerJudge, answer_features

OUTCOME_VALUE = {"success": 1.0, "failure": 0.0}


@dataclass
class TierStats:
    """Running per-tier totals: calls, prompt characters and tokens, ATP charged."""

    chars: float = 0.0
    prompt_tokens: float = 0.0
    atp: float = 0.0
    n: int = 0

    def add(self, chars: int, prompt_tokens: int, atp: float) -> None:
        self.chars += chars
        self.prompt_tokens += prompt_tokens
        self.atp += atp
        self.n += 1

    def tokens_per_char(self) -> float:
        return self.prompt_tokens / self.chars if self.chars > 0 else 0.3

    def mean_atp(self) -> float | None:
        return self.atp / self.n if self.n else None


@dataclass
class Neighbourhood:
    """The k nearest experiences of a request: overall and per tier.

    Attributes:
        sims: cosines of the stored rows the search considered (their maximum is the nearest
            stored prompt's: novelty is 1 − max).
        rows_all: the k nearest rows with a known outcome, any tier.
        rows_by_tier: per tier index, its k nearest direct rows with a known outcome.
    """

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
        self.encoder = make_encoder(config.encoder)  # prompt → unit vector (router/encoder.py)
        self.index = ExperienceIndex(self.encoder.dim, len(self.tiers), ann_min_rows=config.ann_min_rows)
        self.trust = TrustBook((config.prior_alpha, config.prior_beta), config.forgetting)
        # the same Beta posteriors over direct outcomes only (first calls and audits, decided before
        # any answer was seen): what p̂ shrinks toward (see DreamroutePolicy.estimates)
        self.direct_trust = TrustBook((config.prior_alpha, config.prior_beta), config.forgetting)
        self.surprise = {t: SurpriseStats() for t in self.tiers}
        self.tier_stats = {t: TierStats() for t in self.tiers}
        self.calibration = ConfidenceCalibration(len(self.tiers))
        self.judge = AnswerJudge(len(self.tiers))
        self.next_judge = AnswerJudge(len(self.tiers))  # slot t: tier t+1's success given t's answer
        self._judgements: dict[int, tuple] = {}
        self.versions: dict[str, int] = {}
        self.conversations: dict[str, np.ndarray] = {}
        self.serving: dict[str, str] = {}  # conversation → the tier that answered its last turn
        self._recalled: set[str] = set()   # conversations already looked up in the store
        self.exp_rows: dict[int, int] = {}

    # ---- building -------------------------------------------------------------------
    def load(self, store, versions: dict[str, int]) -> None:
        """Rebuild from the store: trust rows and the experiences of the active versions."""
        self.versions = dict(versions)
        by_version = {v: t for t, v in versions.items()}
        for row in store.trust_table():
            if row.model_version_id in by_version:
                self.trust.set(row.model_version_id, row.context, TrustState(row.alpha, row.beta, row.count))
        cols = ["id", "prompt", "tier", "model_version_id", "outcome", "prompt_tokens", "atp_joules",
                "confidence", "surprise", "role", "response", "predicted", "mean_logprob", "request_id",
                "surprise_tier", "context"]
        rows = [r for r in store.experiences(cols) if r["model_version_id"] in by_version]
        if not rows:
            return
        vecs = self.encoder.encode_many([r["prompt"] for r in rows])
        tiers = [self.tier_index[by_version[r["model_version_id"]]] for r in rows]
        outcomes = [OUTCOME_VALUE.get(r["outcome"], math.nan) for r in rows]
        self.index.add_many(vecs, tiers, outcomes, [r["atp_joules"] or 0.0 for r in rows], [r["id"] for r in rows],
                            [r["role"] != "escalated" for r in rows])
        prev = None  # (request id, tier index, answer features) of the row before
        for i, r in enumerate(rows):
            self.exp_rows[r["id"]] = i
            tier = by_version[r["model_version_id"]]
            self.tier_stats[tier].add(len(r["prompt"]), r["prompt_tokens"], r["atp_joules"] or 0.0)
            if r["role"] != "audit" and r["outcome"] in OUTCOME_VALUE:
                self.calibration.add(self.tier_index[tier], r["confidence"], OUTCOME_VALUE[r["outcome"]])
            if r["role"] != "escalated" and r["outcome"] in OUTCOME_VALUE:
                self.direct_trust.observe(r["model_version_id"], r["context"], OUTCOME_VALUE[r["outcome"]])
            feats = None
            if r["response"]:
                feats = answer_features(r["prompt"], r["response"], r["predicted"], r["confidence"],
                                        r["mean_logprob"])
                if r["outcome"] in OUTCOME_VALUE:
                    self.judge.add(tiers[i], feats, OUTCOME_VALUE[r["outcome"]], refit=False)
            if (prev is not None and prev[0] == r["request_id"] and prev[1] + 1 == tiers[i]
                    and prev[2] is not None and r["outcome"] in OUTCOME_VALUE):
                self.next_judge.add(prev[1], prev[2], OUTCOME_VALUE[r["outcome"]], refit=False)
            prev = (r["request_id"], tiers[i], feats)
            if r["surprise"] is not None:
                scorer = r["surprise_tier"] or self.tiers[0]  # before migration 3: the cheapest tier
                if scorer in self.surprise:
                    self.surprise[scorer].add(r["surprise"])
        for i in range(len(self.tiers)):
            self.judge.fit(i)
            self.next_judge.fit(i)

    def recall_conversation(self, store, conversation_id: str) -> bool:
        """Know a conversation this memory has not seen (answered before a restart) again: the
        tier that served its last turn (``serving``) and that turn's prompt vector
        (``conversations``, for drift), from its last stored answer
        (:func:`dreamroute.store.conversations.last_answer`). The store is asked once per
        conversation; a tier this hierarchy lacks is not taken. Returns whether it is known."""
        if conversation_id in self.serving:
            return True
        if conversation_id in self._recalled:
            return False
        self._recalled.add(conversation_id)
        last = last_answer(store, conversation_id)
        if last is None or last["tier"] not in self.tier_index:
            return False
        self.serving[conversation_id] = last["tier"]
        self.conversations.setdefault(conversation_id, self.encoder.encode(last["prompt"]))
        return True

    # ---- querying -------------------------------------------------------------------
    def neighbourhood(self, vec: np.ndarray) -> Neighbourhood:
        """k nearest experiences with a known outcome, overall (for instability) and per tier
        (for p̂ and expected ATP; direct calls only: an escalation's outcome was observed because
        a cheaper tier's answer looked wrong, a harder-than-typical sample of the tier), from the
        per-tier search of :class:`~dreamroute.router.index.ExperienceIndex` (exact for small
        tiers, HNSW for large ones)."""
        sims, rows_all, per_tier = self.index.search(vec, self.config.k)
        return Neighbourhood(sims, rows_all, per_tier)

    def neighbour_counts(self, hood: Neighbourhood, tier: str) -> tuple[float, int]:
        """(successes, trials) among the tier's k nearest experiences."""
        rows = hood.rows_by_tier[self.tier_index[tier]]
        if len(rows) == 0:
            return 0.0, 0
        return float(self.index.outcome[rows].sum()), int(len(rows))

    def expected_atp(self, hood: Neighbourhood, tier: str, prompt_chars: int, max_tokens: int) -> float:
        """Expected ATP of calling ``tier`` for this prompt, J.

        The mean ATP charged to the tier's k nearest experiences (they answered
        similar prompts, so their lengths and costs are alike); else the tier's
        mean; for a tier never called (a new tier), the mean ATP the other tiers were
        charged, each scaled by the ratio of the two tiers' cost models for the same
        call (what this tier would have cost for their answers' lengths); else the cost
        model with the estimated prompt tokens and three quarters of ``max_tokens``.
        """
        rows = hood.rows_by_tier[self.tier_index[tier]]
        if len(rows):
            return float(self.index.atp[rows].mean())
        stats = self.tier_stats[tier]
        if stats.n:
            return stats.mean_atp()
        scaled = []
        for other, st in self.tier_stats.items():
            ref = self.costs[other].joules(100, 100)
            if other != tier and st.n and ref > 0:
                scaled.append(st.mean_atp() * self.costs[tier].joules(100, 100) / ref)
        if scaled:
            return float(np.mean(scaled))
        prompt_tokens = prompt_chars * stats.tokens_per_char() + 12
        return self.costs[tier].joules(int(prompt_tokens), int(0.75 * max_tokens))

    def learn_answers(self, prompt: str, calls: list, values: list[float]) -> None:
        """Teach the answer judges one request's graded calls (``values``: 1.0, 0.0 or NaN if unknown).

        Each call with text teaches its tier's judge; each pair of consecutive calls
        on adjacent tiers (an escalation, an audit) teaches ``next_judge`` how the
        lower tier's answer predicts the upper tier's outcome.
        """
        for k, (c, v) in enumerate(zip(calls, values)):
            if not c.text or math.isnan(v):
                continue
            f = self._features(prompt, c)   # only for a graded call (most served answers are not, yet)
            ti = self.tier_index[c.tier]
            self.judge.add(ti, f, v)
            if k + 1 < len(calls) and self.tier_index[calls[k + 1].tier] == ti + 1 and not math.isnan(values[k + 1]):
                self.next_judge.add(ti, f, values[k + 1])

    def answer_success(self, tier: str, prompt: str, call, prior: float, prior_next: float | None = None
                       ) -> tuple[float, float | None]:
        """P(success | prompt, this answer of ``tier``) and P(next tier succeeds | the same), J-free.

        ``prior`` and ``prior_next`` are the router's p̂ for the tier and the next tier on this
        prompt. The tier's learned answer judge (:class:`~dreamroute.router.judge.AnswerJudge`)
        refines ``prior`` once the tier has one and the answer has text, else the
        confidence-bin calibration does; ``next_judge`` refines ``prior_next`` likewise
        (returned unchanged without a model, None when ``prior_next`` is None).
        """
        i = self.tier_index[tier]
        now, nxt = None, prior_next
        if call.text:
            f = self._features(prompt, call)
            judged = self.judge.predict(i, f)
            if judged is not None:
                now = float(self.judge.combine(i, prior, judged))
            if prior_next is not None and (judged_next := self.next_judge.predict(i, f)) is not None:
                nxt = float(self.next_given(i, prior_next, np.array([judged_next]))[0])
        if now is None:
            now = self.calibration.adjust(i, call.confidence, prior)
        return now, nxt

    def recent_judgements(self, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Both judges' predictions on tier i's latest answers: (P(success | a) by ``judge``,
        P(next succeeds | a) by ``next_judge``), None where a judge has no model. Cached until
        either judge learns or refits (a routing decision needs them for every tier)."""
        key = (i, self.judge.state_key(i), self.next_judge.state_key(i))
        hit = self._judgements.get(i)
        if hit is None or hit[0] != key:
            x = self.judge.recent_features(i)
            hit = (key, self.judge.predict_many(i, x), self.next_judge.predict_many(i, x))
            self._judgements[i] = hit
        return hit[1], hit[2]

    def next_given(self, i: int, prior_next: float, judged_next: np.ndarray) -> np.ndarray:
        """The next tier's P(success | x, tier i's answer) for answers whose ``next_judge``
        predictions are ``judged_next``: p̂_next(x) + q(a) − mean q over tier i's recent answers.

        ``next_judge`` learns only from requests where the next tier was also called
        (escalated or audited: a harder-than-average slice), so its level is biased;
        its variation across answers is what it adds. Centring it on tier i's
        recent answers keeps E_a[P(next | x, a)] = p̂_next(x), the value of calling
        the next tier directly, so a cascade and a direct call are priced consistently
        (values are not clipped to [0, 1], which would break that equality; the router
        only compares them).
        """
        _, recent = self.recent_judgements(i)
        centre = float(recent.mean()) if recent is not None and len(recent) else float(judged_next.mean())
        return prior_next + judged_next - centre  # not clipped: only differences and maxima are used

    @staticmethod
    def _features(prompt: str, call) -> np.ndarray:
        return answer_features(prompt, call.text, call.predicted, call.confidence, call.generation.mean_logprob)

    def trust_state(self, tier: str, context: str) -> TrustState:
        return self.trust.get(self.versions[tier], context)

    def direct_trust_state(self, tier: str, context: str) -> TrustState:
        """Trust of the tier in the context from direct outcomes only (first calls and audits)."""
        return self.direct_trust.get(self.versions[tier], context)

    def direct_count(self, tier: str) -> int:
        """Graded direct outcomes (first calls and audits) of the tier's current version, all contexts."""
        vid = self.versions[tier]
        return sum(self.direct_trust.get(vid, c).count for c in CONTEXTS)
