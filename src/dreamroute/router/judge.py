"""Learned answer judge: P(success | prompt, a tier's answer), from graded outcomes.

A cascade decides whether to escalate after reading the cheaper tier's
answer. The answer says more than its token confidence: how long it is next
to the question, whether it states a final answer in the expected form,
whether that answer is a number the question already gave, how many
quantities the question carries. :class:`AnswerJudge` learns, per tier, how
these generic features predict success, from the tier's own graded answers
(bandit feedback: only answers that were given are ever graded).

The model is L2-regularised logistic regression on standardised features
(scikit-learn), refitted on the tier's latest ``window`` observations every
``refit_every`` new ones (a follow-the-regularised-leader scheme: each refit
is the batch optimum on everything seen, so it is far less noisy than one
SGD step per observation on a few hundred examples). Until a tier has
``min_fit`` graded answers of both outcomes, it has no judge and the router
falls back to its confidence-bin calibration.

Nothing here knows a benchmark: the features are the same for any prompt
and any grader, and their weights are learned per tier from outcomes.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FEATURES = ("form", "form_known", "log_response_chars", "log_prompt_chars", "log_length_ratio",
            "log_prompt_numbers", "log_response_numbers", "log_response_lines", "answer_missing",
            "answer_fractional", "answer_in_prompt", "mean_logprob", "logprob_known")


def form_factor(confidence: float | None, mean_logprob: float | None) -> float | None:
    """The answer-form part of :func:`dreamroute.router.engine.confidence` (1, 0.5, or None).

    confidence = exp(mean logprob) × form, so form = confidence / exp(mean logprob).
    """
    if confidence is None:
        return None
    if mean_logprob is None:
        return confidence
    p = math.exp(max(-50.0, mean_logprob))
    return min(1.0, confidence / p) if p > 0 else None


def answer_features(prompt: str, response: str, predicted: str | None, confidence: float | None,
                    mean_logprob: float | None) -> np.ndarray:
    """Feature vector (len(FEATURES),) of one answer, in the order of ``FEATURES``.

    Args:
        prompt: the user's prompt text.
        response: the tier's answer text.
        predicted: the final answer the request's grader extracted, or None.
        confidence: the call's confidence (see ``engine.confidence``), or None.
        mean_logprob: mean natural-log probability per generated token, or None.
    """
    form = form_factor(confidence, mean_logprob)
    rc, pc = len(response), max(1, len(prompt))
    answer = (predicted or "").replace(",", "")
    return np.array([
        (1.0 if form >= 0.99 else 0.0) if form is not None else 0.0,
        1.0 if form is not None else 0.0,
        math.log1p(rc),
        math.log1p(pc),
        math.log1p(rc) - math.log1p(pc),
        math.log1p(len(NUMBER.findall(prompt))),
        math.log1p(len(NUMBER.findall(response))),
        math.log1p(response.count("\n")),
        1.0 if not answer else 0.0,
        1.0 if "." in answer or "/" in answer else 0.0,
        1.0 if answer and answer in prompt.replace(",", "") else 0.0,
        max(-20.0, mean_logprob) if mean_logprob is not None else 0.0,
        1.0 if mean_logprob is not None else 0.0,
    ])


class AnswerJudge:
    """Per-tier logistic model of answer success (see the module docstring).

    The same class also learns, per tier t, P(tier t+1 succeeds | tier t's answer)
    from requests where both answered (escalations, audits): a cheap answer
    that looks wrong also says the item is hard for the next tier, one that
    looks right that the next tier will very likely be right too.

    Args:
        n_tiers: number of tiers.
        min_fit: graded answers (with both outcomes present) before a tier is judged.
        refit_every: new observations between refits.
        window: the refit uses at most this many latest observations.
        C: inverse L2 strength of scikit-learn's ``LogisticRegression``.
    """

    def __init__(self, n_tiers: int, min_fit: int = 40, refit_every: int = 25, window: int = 5000,
                 C: float = 1.0):
        self.n_tiers, self.min_fit, self.refit_every, self.window, self.C = n_tiers, min_fit, refit_every, window, C
        self._x: list[list[np.ndarray]] = [[] for _ in range(n_tiers)]
        self._y: list[list[float]] = [[] for _ in range(n_tiers)]
        self._since = [0] * n_tiers
        self._model: list[tuple | None] = [None] * n_tiers
        self._seen = [0] * n_tiers  # observations ever added (keys the caches below)
        self._fits = [0] * n_tiers
        self._recent: dict[int, tuple[tuple, np.ndarray]] = {}  # tier → ((n, seen), latest features)
        self._base: dict[int, tuple[int, float]] = {}            # tier → (seen, base rate)

    def add(self, tier: int, features: np.ndarray, outcome: float, refit: bool = True) -> None:
        """One graded answer of ``tier`` (outcome 1.0 success / 0.0 failure)."""
        self._x[tier].append(np.asarray(features, dtype=float))
        self._y[tier].append(float(outcome))
        self._seen[tier] += 1
        if len(self._x[tier]) > 2 * self.window:  # keep memory bounded
            del self._x[tier][: self.window]
            del self._y[tier][: self.window]
        self._since[tier] += 1
        if refit and (self._model[tier] is None or self._since[tier] >= self.refit_every):
            self.fit(tier)

    def fit(self, tier: int) -> None:
        """Refit ``tier``'s model on its latest ``window`` observations (no-op below ``min_fit``)."""
        from sklearn.linear_model import LogisticRegression

        y = np.array(self._y[tier][-self.window:])
        if len(y) < self.min_fit or y.min() == y.max():
            return
        x = np.vstack(self._x[tier][-self.window:])
        mu, sd = x.mean(axis=0), x.std(axis=0)
        sd[sd < 1e-9] = 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(C=self.C, max_iter=300).fit((x - mu) / sd, y)
        self._model[tier] = (mu, sd, clf.coef_[0].copy(), float(clf.intercept_[0]))
        self._since[tier] = 0
        self._fits[tier] += 1

    def state_key(self, tier: int) -> tuple[int, int]:
        """(observations seen, refits) of a tier: changes whenever its predictions may."""
        return self._seen[tier], self._fits[tier]

    def fitted(self, tier: int) -> bool:
        return self._model[tier] is not None

    def predict(self, tier: int, features: np.ndarray) -> float | None:
        """P(success) of this answer of ``tier``, or None while the tier has no model."""
        p = self.predict_many(tier, np.asarray(features, dtype=float)[None, :])
        return None if p is None else float(p[0])

    def base_rate(self, tier: int) -> float:
        """The tier's success rate over the judge's window (Laplace-smoothed)."""
        hit = self._base.get(tier)
        if hit is None or hit[0] != self._seen[tier]:
            y = self._y[tier][-self.window:]
            hit = self._base[tier] = (self._seen[tier], (sum(y) + 1.0) / (len(y) + 2.0))
        return hit[1]

    def combine(self, tier: int, prior, judged):
        """P(success | x, answer) from the router's item prior p̂(x) and the judge's P(success | answer),
        as independent evidence (naive Bayes in odds form, as ``ConfidenceCalibration.adjust``):

            logit P = logit p̂(x) + logit P(success | answer) − logit P(success)

        ``prior`` and ``judged`` may be floats or arrays; the result has their broadcast shape.
        """
        lo = lambda q: np.log(np.clip(q, 1e-6, 1 - 1e-6) / (1 - np.clip(q, 1e-6, 1 - 1e-6)))  # noqa: E731
        z = lo(np.asarray(prior, float)) + lo(np.asarray(judged, float)) - lo(self.base_rate(tier))
        return 1.0 / (1.0 + np.exp(-z))

    def predict_many(self, tier: int, x: np.ndarray) -> np.ndarray | None:
        """P(success) for each row of ``x`` (shape (n, len(FEATURES))), or None while the tier has no model."""
        m = self._model[tier]
        if m is None:
            return None
        mu, sd, w, b = m
        return 1.0 / (1.0 + np.exp(-np.clip(((x - mu) / sd) @ w + b, -50, 50)))

    def recent_features(self, tier: int, n: int = 200) -> np.ndarray:
        """Features of the tier's latest ``n`` observed answers, shape (≤ n, len(FEATURES)): a sample
        of what its next answer may look like."""
        if not self._x[tier]:
            return np.zeros((0, len(FEATURES)))
        hit = self._recent.get(tier)
        if hit is None or hit[0] != (n, self._seen[tier]):  # rebuilt once per new observation
            hit = self._recent[tier] = ((n, self._seen[tier]), np.vstack(self._x[tier][-n:]))
        return hit[1]
