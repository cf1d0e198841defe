"""The server's side of the fast path: serve a cached answer, and route feedback on a hit.

The cache itself (:class:`~dreamroute.cache.response.ResponseCache`: keys, eligibility,
invalidation) belongs to the core, kept current by the engine. Here: a hit gets a response id
of its own, remembered (bounded, least recent first out) so that feedback on it reaches the
answer it served: a failure reported on a hit removes that answer from the cache and counts
against the tier that produced it. Hits are not stored as experiences (they teach the router
nothing and cost no model ATP); they are counted in the metrics and in ``/v1/trust``.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from ..cache.response import CachedAnswer

RESPONSE_PREFIX = "chatcmpl-"


def request_id_of(response_id: str) -> str:
    """The request id in a response id (``chatcmpl-<request id>``, or the bare request id)."""
    rid = response_id.strip()
    return rid[len(RESPONSE_PREFIX):] if rid.startswith(RESPONSE_PREFIX) else rid


class FastPath:
    """Fast-path lookups of one app.

    Args:
        dr: the served DreamRoute (its ``cached`` does the lookup; None without ``fast_path``).
        max_aliases: hit ids remembered for feedback.

    Attributes:
        hits: hits served since start.
    """

    def __init__(self, dr, max_aliases: int = 100_000):
        self.dr = dr
        self.max_aliases = max_aliases
        self.hits = 0
        self._aliases: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.dr.responses is not None

    def lookup(self, messages: list[dict], max_tokens: int, tier: str | None) -> tuple[str, CachedAnswer] | None:
        """(a new request id for the hit, the cached answer), or None on a miss."""
        hit = self.dr.cached(messages, max_tokens=max_tokens, tier=tier)
        if hit is None:
            return None
        rid = uuid.uuid4().hex
        with self._lock:
            self.hits += 1
            self._aliases[rid] = hit.request_id
            while len(self._aliases) > self.max_aliases:
                self._aliases.popitem(last=False)
        return rid, hit

    def resolve(self, response_id: str) -> str:
        """The stored request a response id refers to (a hit's id → the request it served from)."""
        rid = request_id_of(response_id)
        with self._lock:
            return self._aliases.get(rid, rid)
