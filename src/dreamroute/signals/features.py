"""Signals of DESIGN.md: features, novelty, drift, instability, surprise, context, SNARC.

Features are hashed character n-grams (scikit-learn's ``char_wb`` analyzer,
3–5-grams, 2^18 buckets, L2-normalised), so a dot product is a cosine. The experience index keeps every stored prompt's vector as an
inverted index (features × experiences, CSR), so a query costs one sparse
vector–matrix product over the postings of the query's n-grams: exact cosines,
about 0.6 ms for 10,000 GSM8K-length prompts on one core.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

from ..config import RouterConfig

N_FEATURES = 2**18


class FeatureEncoder:
    """Text → sparse L2-normalised term-count vector of shape (1, 2^18), float32.

    The n-grams are scikit-learn's ``char_wb`` analyzer (lower-cased,
    3–5-grams within word boundaries); each is hashed with CRC-32 into 2^18
    buckets (the hashing trick, Weinberger et al. 2009; the same vectors as
    ``HashingVectorizer`` up to the choice of hash, at a fifth of its
    per-call overhead).
    """

    def __init__(self, n_features: int = N_FEATURES, ngram_range: tuple[int, int] = (3, 5)):
        if n_features & (n_features - 1):
            raise ValueError(f"n_features must be a power of two, got {n_features}")
        self.n_features = n_features
        self._analyze = HashingVectorizer(analyzer="char_wb", ngram_range=ngram_range,
                                          lowercase=True).build_analyzer()

    def _parts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        grams = self._analyze(text)
        if not grams:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        idx = np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.int64, count=len(grams))
        cols, counts = np.unique(idx & (self.n_features - 1), return_counts=True)
        vals = counts.astype(np.float32)
        vals /= np.float32(np.sqrt(float((vals * vals).sum())))
        return cols.astype(np.int32), vals

    def encode(self, text: str) -> sp.csr_matrix:
        cols, vals = self._parts(text)
        return sp.csr_matrix((vals, cols, np.array([0, len(cols)], dtype=np.int32)), shape=(1, self.n_features))

    def encode_many(self, texts: list[str]) -> sp.csr_matrix:
        parts = [self._parts(t) for t in texts]
        indptr = np.zeros(len(parts) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(c) for c, _ in parts])
        cols = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int32)
        vals = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, np.float32)
        return sp.csr_matrix((vals, cols, indptr), shape=(len(parts), self.n_features))


class ExperienceIndex:
    """Nearest-neighbour index over stored experiences (rows appended in id order).

    Per row: the prompt vector, the tier index, the outcome (1.0 success, 0.0
    failure, NaN unknown) and the ATP the call was charged (J). Appends go to a small
    tail that is merged into the inverted index every ``merge_every`` rows.
    """

    def __init__(self, n_features: int = N_FEATURES, merge_every: int = 32):
        self.n_features = n_features
        self.merge_every = merge_every
        self._main_t = sp.csr_matrix((n_features, 0), dtype=np.float32)  # features × rows
        self._main_rows: list[sp.csr_matrix] = []
        self._tail: list[sp.csr_matrix] = []
        self._tail_stack: sp.csr_matrix | None = None
        self.tier = np.zeros(0, dtype=np.int16)
        self.outcome = np.zeros(0, dtype=np.float32)
        self.atp = np.zeros(0, dtype=np.float32)
        # False for rows observed only because a cheaper tier's answer looked wrong (escalations):
        # a biased sample of the tier, left out of its p̂
        self.direct = np.zeros(0, dtype=bool)
        self.ids = np.zeros(0, dtype=np.int64)
        self.outcome_version = 0  # bumped when a stored outcome changes (feedback)

    def __len__(self) -> int:
        return len(self.tier)

    def add(self, vec: sp.csr_matrix, tier: int, outcome: float, atp: float, exp_id: int = -1,
            direct: bool = True) -> int:
        """Append one experience; returns its row."""
        self._tail.append(vec)
        self._tail_stack = None
        self.tier = np.append(self.tier, np.int16(tier))
        self.outcome = np.append(self.outcome, np.float32(outcome))
        self.atp = np.append(self.atp, np.float32(atp))
        self.direct = np.append(self.direct, bool(direct))
        self.ids = np.append(self.ids, np.int64(exp_id))
        if len(self._tail) >= self.merge_every:
            self._merge()
        return len(self.tier) - 1

    def add_many(self, vecs: sp.csr_matrix, tiers, outcomes, atp, ids, direct=None) -> None:
        """Bulk append (used when rebuilding from the store)."""
        if vecs.shape[0] == 0:
            return
        self._merge()
        self._main_rows.append(vecs.tocsr())
        self._main_t = sp.vstack(self._main_rows).T.tocsr() if self._main_rows else self._main_t
        self.tier = np.concatenate([self.tier, np.asarray(tiers, dtype=np.int16)])
        self.outcome = np.concatenate([self.outcome, np.asarray(outcomes, dtype=np.float32)])
        self.atp = np.concatenate([self.atp, np.asarray(atp, dtype=np.float32)])
        self.direct = np.concatenate([self.direct, np.ones(len(tiers), dtype=bool) if direct is None
                                      else np.asarray(direct, dtype=bool)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])

    def set_outcome(self, row: int, outcome: float) -> None:
        self.outcome[row] = outcome
        self.outcome_version += 1

    def _merge(self) -> None:
        if not self._tail:
            return
        self._main_rows.append(sp.vstack(self._tail).tocsr())
        self._tail = []
        self._tail_stack = None
        if len(self._main_rows) > 1:
            self._main_rows = [sp.vstack(self._main_rows).tocsr()]
        self._main_t = self._main_rows[0].T.tocsr()

    def similarities(self, vec: sp.csr_matrix) -> np.ndarray:
        """Cosine of ``vec`` with every stored row, shape (len(self),), float32."""
        parts = []
        if self._main_t.shape[1]:
            # rows of the inverted index for the query's n-grams, weighted by the query's values
            parts.append(self._main_t[vec.indices].T.dot(vec.data))
        if self._tail:
            if self._tail_stack is None:
                self._tail_stack = sp.vstack(self._tail).tocsr()
            parts.append(np.asarray((self._tail_stack @ vec.T).todense()).ravel())
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def top_k(sims: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """Rows of the k largest ``sims`` among ``mask`` (all rows if None), unordered."""
    idx = np.flatnonzero(mask) if mask is not None else np.arange(len(sims))
    if len(idx) <= k:
        return idx
    part = np.argpartition(-sims[idx], k - 1)[:k]
    return idx[part]


def novelty(sims: np.ndarray) -> float:
    """n(x) = 1 − max cosine to the stored prompts; 1.0 with an empty memory."""
    return 1.0 if len(sims) == 0 else float(min(1.0, max(0.0, 1.0 - float(sims.max()))))


def instability(outcomes: np.ndarray) -> float:
    """u(x) = variance of the known outcomes of the k nearest experiences; 0 with fewer than 3."""
    known = outcomes[~np.isnan(outcomes)]
    return 0.0 if len(known) < 3 else float(known.var())


def drift(vec, previous) -> float:
    """d(x) = 1 − cosine with the previous turn of the same conversation; 0 for a first turn.
    Vectors are unit-length: dense (d,) arrays (the router's encoders) or sparse (1, d) rows."""
    if previous is None:
        return 0.0
    if isinstance(vec, np.ndarray):
        cos = float(np.dot(vec, previous))
    else:
        cos = float((vec @ previous.T).toarray()[0, 0])
    return float(min(1.0, max(0.0, 1.0 - cos)))


class SurpriseStats:
    """Running mean and spread of a tier's prompt surprise (Welford 1962)."""

    def __init__(self):
        self.n = 0
        self.mean = 0.0
        self._m2 = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self._m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 0.0

    def z(self, x: float) -> float | None:
        """z-score of x against what was seen so far; None with fewer than 5 observations."""
        if self.n < 5 or self.std <= 1e-9:
            return None
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Signals:
    """What the router knows about a request before deciding.

    Attributes:
        novelty, drift: in [0, 1]. instability: outcome variance in [0, 0.25].
        surprise: mean NLL per prompt token (nats) under the cheapest tier, or None.
        surprise_z: its z-score against that tier's running statistics, or None.
        context: ``stable`` | ``moving`` | ``unstable`` | ``novel``.
    """

    novelty: float
    drift: float
    instability: float
    surprise: float | None
    surprise_z: float | None
    context: str


def classify_context(n: float, u: float, d: float, surprise_z: float | None, cfg: RouterConfig) -> str:
    """DESIGN.md: novel if n ≥ τn, else unstable if u ≥ τu or surprise ≥ τs, else moving if d ≥ τd, else stable."""
    if n >= cfg.tau_novel:
        return "novel"
    if u >= cfg.tau_unstable or (surprise_z is not None and surprise_z >= cfg.tau_surprise):
        return "unstable"
    if d >= cfg.tau_drift:
        return "moving"
    return "stable"


def logistic(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


@dataclass(frozen=True)
class Snarc:
    """SNARC salience components, each in [0, 1], and their weighted sum (DESIGN.md)."""

    s: float
    n: float
    a: float
    r: float
    c: float
    salience: float


def snarc(surprise_z: float | None, novelty_: float, priority: float, reward: float | None,
          conflict: float, weights: dict[str, float]) -> Snarc:
    """Salience of an experience.

    S = logistic(z-score of surprise) (0.5 when surprise is missing),
    N = novelty, A = priority clipped to [0, 1], R = 1 success / 0 failure /
    0.5 unknown (or a rating), C = disagreement between two tiers' answers
    (0 when only one answered). Salience = Σ w_i · component_i / Σ w_i.
    """
    s = 0.5 if surprise_z is None else logistic(surprise_z)
    a = min(1.0, max(0.0, float(priority)))
    r = 0.5 if reward is None else min(1.0, max(0.0, float(reward)))
    n = min(1.0, max(0.0, novelty_))
    c = min(1.0, max(0.0, conflict))
    total = sum(weights.values()) or 1.0
    sal = (weights["S"] * s + weights["N"] * n + weights["A"] * a + weights["R"] * r + weights["C"] * c) / total
    return Snarc(s, n, a, r, c, sal)
