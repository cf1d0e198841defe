"""The recorded-outcome data: :class:`RecordedCall`, :class:`RecordedItem`, :class:`RecordedSet`,
and what is computed from them (:func:`recorded_digest`, :func:`tier_accuracy`, :func:`oracle_tier`).

:func:`dreamroute.eval.recorded.load_recorded` builds a :class:`RecordedSet` from a file or
directory; its module docstring describes the formats it reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

__all__ = ["RecordedCall", "RecordedItem", "RecordedSet", "tier_accuracy", "oracle_tier", "recorded_digest"]


@dataclass(frozen=True)
class RecordedCall:
    """One tier's recorded answer to one item.

    Attributes:
        tier / model: who answered.
        response: the answer text (None where the source has none, e.g. RouteLLM MMLU).
        correct: the recorded grade.
        prompt_tokens / completion_tokens / seconds / mean_logprob: as recorded, None when unknown.
        atp_joules: the cost the source gives (RouteLLM: strong 1, weak 0; a
            collected line: the ATP charged when it was collected), else None.
    """

    tier: str
    model: str
    response: str | None
    correct: bool
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float | None
    mean_logprob: float | None
    atp_joules: float | None


@dataclass(frozen=True)
class RecordedItem:
    """One item with every tier's recorded call.

    Attributes:
        key: unique within the set.
        prompt: the user message exactly as it was sent to the models.
        gold: the gold answer, None when the grade is all there is (RouteLLM).
        grader: a ``dreamroute.grading`` name, or None.
        calls: tier → :class:`RecordedCall`.
    """

    key: str
    prompt: str
    gold: str | None
    grader: str | None
    calls: dict[str, RecordedCall] = field(hash=False)


@dataclass(frozen=True)
class RecordedSet:
    """A loaded recorded source.

    Attributes:
        name: the file or directory name.
        kind: ``"outcomes"`` or ``"routellm"``.
        tiers: tier names, cheapest first.
        items: the items, in file order.
        digest: :func:`recorded_digest` of the items (sha256 hex).
        dropped: rows dropped as contaminated (RouteLLM), else 0.
        files: the data files read, in order.
        models: tier → model name (of the first item).
    """

    name: str
    kind: str
    tiers: list[str]
    items: list[RecordedItem]
    digest: str
    dropped: int = 0
    files: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {it.key: it for it in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def get(self, key: str) -> RecordedItem:
        """The item with this key. Raises KeyError naming the key."""
        try:
            return self._by_key[key]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"no recorded item has key {key!r} in {self.name}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._by_key  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- helpers


def recorded_digest(tiers: list[str], items: list[RecordedItem]) -> str:
    """sha256 (hex) over the tier order and each item's key, prompt, gold, grader and
    every tier's recorded outcome (model, correct, response, tokens, seconds,
    mean logprob, ATP), in order. Stable across runs and platforms."""
    h = hashlib.sha256()
    h.update(json.dumps(list(tiers), ensure_ascii=False).encode("utf-8") + b"\n")
    for it in items:
        calls = [[t, c.model, c.correct, c.response, c.prompt_tokens, c.completion_tokens, c.seconds,
                  c.mean_logprob, c.atp_joules] for t in tiers for c in [it.calls[t]]]
        record = [it.key, it.prompt, it.gold, it.grader, calls]
        h.update(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def tier_accuracy(rs: RecordedSet) -> dict[str, float]:
    """Fraction of items each tier answered correctly (tier → accuracy; NaN for no items)."""
    n = len(rs.items)
    return {t: (sum(it.calls[t].correct for it in rs.items) / n if n else math.nan) for t in rs.tiers}


def oracle_tier(item: RecordedItem, tiers: list[str]) -> str:
    """The cheapest tier (``tiers`` is cheapest first) that answered correctly, else the
    cheapest tier — RouterBench's oracle."""
    if not tiers:
        raise ValueError("oracle_tier needs at least one tier")
    for t in tiers:
        if item.calls[t].correct:
            return t
    return tiers[0]
