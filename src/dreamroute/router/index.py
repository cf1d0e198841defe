"""The experience index: stored prompts' vectors and what happened, searched per tier.

Rows are appended in experience order. Per row: the prompt's vector (dense,
L2-normalised, from :mod:`dreamroute.router.encoder`), the tier index, the outcome
(1.0 success, 0.0 failure, NaN unknown), the ATP the call was charged (J), whether it
was a direct call (decided before any answer was seen), and the experience id.

Search is per tier, since the router wants each tier's k nearest experiences (for p̂
and expected ATP) and the k nearest of all (for instability): a tier's rows are kept
in a block of their own. While a tier has fewer than ``ann_min_rows`` rows its block
is searched exactly (one matrix–vector product); from then on through an approximate
nearest-neighbour index: faiss's HNSW graph (Malkov & Yashunin, "Efficient and robust
approximate nearest neighbor search using Hierarchical Navigable Small World graphs",
IEEE TPAMI 2020; Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs",
2017, for the library), inner product on unit vectors = cosine, M = 32 links,
efConstruction 128, efSearch ``ef_search`` (80), doubled once a tier holds 16,384 rows
(measured on GSM8K and generated prompts, whose shared instruction makes them all
alike: recall@20 0.89 at ef 80 and 0.97 at ef 160 with 33,000 rows per tier). The HNSW graph returns ``fetch`` ≥ k
candidates per tier with their exact cosines (it stores the vectors uncompressed);
the k best of them with a known outcome are the neighbours. Without faiss installed,
every search is exact. A new tier's few rows are thus always searched exactly, and a
large tier's search costs about the same at 10,000 and 100,000 rows.
"""

from __future__ import annotations

import numpy as np

try:  # optional at import time: exact search works without it
    import faiss  # type: ignore
    faiss.omp_set_num_threads(1)  # one query at a time beside the models: OpenMP threads only spin
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; this keeps a broken install usable
    faiss = None


class _Growing:
    """An array that grows by doubling (amortised O(1) appends); ``view`` is the filled part."""

    def __init__(self, dtype, width: int | None = None, cap: int = 64):
        self.data = np.zeros((cap,) if width is None else (cap, width), dtype=dtype)
        self.n = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.data.dtype)
        k = len(values)
        if self.n + k > len(self.data):
            cap = max(2 * len(self.data), self.n + k)
            new = np.zeros((cap,) + self.data.shape[1:], dtype=self.data.dtype)
            new[:self.n] = self.data[:self.n]
            self.data = new
        self.data[self.n:self.n + k] = values
        self.n += k

    @property
    def view(self) -> np.ndarray:
        return self.data[:self.n]


class _TierBlock:
    """One tier's rows: their vectors (contiguous), global row numbers, and its HNSW graph once built."""

    def __init__(self, dim: int):
        self.vecs = _Growing(np.float32, dim)
        self.rows = _Growing(np.int64)
        self.ann = None


class ExperienceIndex:
    """Per-tier nearest-neighbour search over stored experiences (module docstring).

    Args:
        dim: vector dimension.
        n_tiers: number of tiers (tier indices 0 … n_tiers − 1).
        ann_min_rows: rows a tier needs before its block is searched through HNSW.
        fetch: candidates asked of HNSW per tier (at least k).
        ef_search: HNSW's search breadth (recall against cost).
        hnsw_m / ef_construction: HNSW's links per node and build breadth.

    Attributes (length ``len(self)``, in row order): ``tier``, ``outcome``, ``atp``, ``direct``,
    ``ids``; ``outcome_version`` is bumped whenever a stored outcome changes (feedback).
    """

    def __init__(self, dim: int, n_tiers: int, *, ann_min_rows: int = 1024, fetch: int = 40, ef_search: int = 80,
                 hnsw_m: int = 32, ef_construction: int = 128):
        self.dim = dim
        self.n_tiers = n_tiers
        self.ann_min_rows = ann_min_rows
        self.fetch = fetch
        self.ef_search = ef_search
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self._tier = _Growing(np.int16)
        self._outcome = _Growing(np.float32)
        self._atp = _Growing(np.float32)
        self._direct = _Growing(np.bool_)
        self._ids = _Growing(np.int64)
        self._blocks = [_TierBlock(dim) for _ in range(n_tiers)]
        self.outcome_version = 0

    # ---- rows ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._tier.n

    tier = property(lambda self: self._tier.view)
    outcome = property(lambda self: self._outcome.view)
    atp = property(lambda self: self._atp.view)
    direct = property(lambda self: self._direct.view)
    ids = property(lambda self: self._ids.view)

    def add(self, vec: np.ndarray, tier: int, outcome: float, atp: float, exp_id: int = -1,
            direct: bool = True) -> int:
        """Append one experience (``vec``: (dim,) unit vector); returns its row."""
        self.add_many(np.asarray(vec, dtype=np.float32).reshape(1, -1), [tier], [outcome], [atp], [exp_id], [direct])
        return len(self) - 1

    def add_many(self, vecs: np.ndarray, tiers, outcomes, atp, ids, direct=None) -> None:
        """Bulk append: ``vecs`` (n, dim) and the per-row fields (used when rebuilding from the store).
        Raises ValueError for vectors of another dimension or a tier out of range."""
        vecs = np.asarray(vecs, dtype=np.float32)
        if len(vecs) == 0:
            return
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), got {vecs.shape}")
        tiers = np.asarray(tiers, dtype=np.int16)
        if tiers.min() < 0 or tiers.max() >= self.n_tiers:
            raise ValueError(f"tier index out of range 0..{self.n_tiers - 1}")
        start = len(self)
        self._tier.extend(tiers)
        self._outcome.extend(outcomes)
        self._atp.extend(atp)
        self._direct.extend(np.ones(len(tiers), bool) if direct is None else direct)
        self._ids.extend(ids)
        rows = np.arange(start, start + len(tiers))
        for t in np.unique(tiers):
            sel = tiers == t
            b = self._blocks[int(t)]
            b.vecs.extend(vecs[sel])
            b.rows.extend(rows[sel])
            if b.ann is not None:
                b.ann.add(np.ascontiguousarray(vecs[sel]))
            elif faiss is not None and b.rows.n >= self.ann_min_rows:
                self._build(b)

    def _build(self, b: _TierBlock) -> None:
        ann = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        ann.hnsw.efConstruction = self.ef_construction
        ann.hnsw.efSearch = self.ef_search
        ann.add(np.ascontiguousarray(b.vecs.view))
        b.ann = ann

    def set_outcome(self, row: int, outcome: float) -> None:
        """A changed verdict for ``row`` (feedback)."""
        self._outcome.data[row] = outcome
        self.outcome_version += 1

    @property
    def approximate_tiers(self) -> list[int]:
        """Tier indices whose block is searched through HNSW."""
        return [i for i, b in enumerate(self._blocks) if b.ann is not None]

    # ---- search ----------------------------------------------------------------------
    def candidates(self, q: np.ndarray, tier: int, k: int, exact: bool = False,
                   known_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosines) of up to ``k`` nearest rows of ``tier`` (HNSW once the tier is large, unless
        ``exact``), best first. ``known_first``: an exact search ranks rows with a known outcome
        before the others (so the k it returns hold as many known rows as there are)."""
        b = self._blocks[tier]
        if b.rows.n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if b.ann is not None and not exact:
            # a larger graph needs a wider search for the same recall: twice as wide past 16,384 rows
            b.ann.hnsw.efSearch = max(k, self.ef_search * (2 if b.rows.n >= 16384 else 1))
            sims, local = b.ann.search(q.reshape(1, -1), k)
            keep = local[0] >= 0
            return b.rows.view[local[0][keep]], sims[0][keep]
        raw = b.vecs.view @ q
        sims = np.where(np.isnan(self.outcome[b.rows.view]), raw - 4.0, raw) if known_first else raw
        if len(sims) > k:  # (cosines are in [-1, 1]: an unknown row ranks after every known one)
            part = np.argpartition(-sims, k - 1)[:k]
            part = part[np.argsort(-sims[part])]
            if known_first and (top := int(np.argmax(raw))) not in part:
                part = np.append(part, top)  # the nearest stored prompt, known or not (novelty)
        else:
            part = np.argsort(-sims)
        return b.rows.view[part], raw[part]

    def search(self, q: np.ndarray, k: int, exact: bool = False
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The neighbourhood of unit vector ``q``: (cosines of the rows considered (their maximum is
        the nearest stored prompt's), the k nearest rows with a known outcome of any tier, each
        tier's k nearest direct rows with a known outcome, best first).

        Each tier gives its ``fetch`` (≥ k) nearest rows; the known ones among them are ranked by
        cosine. ``exact`` searches every block exactly (to measure recall)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        outcome, direct = self.outcome, self.direct
        considered, known_rows, known_sims, per_tier = [], [], [], []
        for t in range(self.n_tiers):
            fetch = self._blocks[t].rows.n if exact else max(self.fetch, k)
            rows, sims = self.candidates(q, t, fetch, exact, known_first=True)
            considered.append(sims)
            known = ~np.isnan(outcome[rows])
            kr, ks = rows[known], sims[known]
            known_rows.append(kr)
            known_sims.append(ks)
            per_tier.append(kr[direct[kr]][:k])
        sims_all = np.concatenate(considered) if considered else np.zeros(0, np.float32)
        rows_all = np.concatenate(known_rows) if known_rows else np.zeros(0, np.int64)
        ks_all = np.concatenate(known_sims) if known_sims else np.zeros(0, np.float32)
        if len(rows_all) > k:
            rows_all = rows_all[np.argpartition(-ks_all, k - 1)[:k]]
        return sims_all, rows_all, per_tier

    def recall_at(self, q: np.ndarray, k: int = 20) -> float | None:
        """Recall@k of the approximate search against exact search for ``q``, over the tiers searched
        through HNSW: the mean over them of the fraction of the exact k nearest that the
        approximate k nearest recover, counting a returned row whose cosine ties the exact k-th
        (within 1e-6) as recovered (rows with equal vectors are interchangeable); None when no
        tier is searched through HNSW."""
        vals = []
        q = np.ascontiguousarray(q, dtype=np.float32)
        for t in self.approximate_tiers:
            approx, _ = self.candidates(q, t, k)
            exact, exact_sims = self.candidates(q, t, k, exact=True)
            if not len(exact):
                continue
            b = self._blocks[t]
            pos = {int(r): i for i, r in enumerate(b.rows.view)}
            sims = np.array([float(b.vecs.view[pos[int(r)]] @ q) for r in approx])
            hits = min(len(exact), int((sims >= exact_sims.min() - 1e-6).sum()))
            vals.append(hits / len(exact))
        return float(np.mean(vals)) if vals else None


__all__ = ["ExperienceIndex"]
