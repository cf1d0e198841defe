"""Recordings whose difficulty shifts: easy→hard, hard→easy, bursts, built in code.

Issue 12's pacing and exploration checks run the live router (``simulate``) over
recordings where the traffic changes under it. Each item has a *level*: the
cheapest tier that answers it (level 0: every tier, level L: tiers L and above,
level = number of tiers: none), and each tier's recorded answer is correct
exactly when its index is at least the level, flipped with probability
``noise``. Every call costs its tier's cost (about 1 : 4 : 10 by default) times a
uniform jitter in [1 − ``jitter``, 1 + ``jitter``], recorded as ``atp_joules``
with no token counts, so replay charges it as recorded. Tier names are free (the
defaults are not the built-in hierarchy's, so nothing can lean on those).

Levels come from the items themselves, never from their position:
:func:`levelled_items` reads them off a property of the item that its text
partly shows (the number of operations of a generated word problem; the number
of solution steps of a GSM8K question), so a router can learn them only as well
as its features let it. :func:`arrange` then orders a pool of levelled items
into a pattern.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .recorded_set import RecordedCall, RecordedItem, RecordedSet, recorded_digest

TIERS = ("swift", "steady", "sage")
COSTS = (1.0, 4.0, 10.0)
PATTERNS = ("easy_hard", "hard_easy", "bursts", "mixed")


@dataclass(frozen=True)
class Levelled:
    """One prompt with its level (the cheapest tier index that answers it) and a key."""

    key: str
    prompt: str
    level: int


def gsm8k_steps(answer: str) -> int:
    """Solution steps of a GSM8K answer: its non-empty lines before the ``####`` line."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def levelled_items(source: str | Path, *, cuts: tuple[int, ...] = (2, 4), limit: int | None = None
                   ) -> list[Levelled]:
    """Items of a GSM8K JSONL file (``question``, ``answer``) or ``builtin:arithmetic?n=N`` with
    a level each: the number of solution steps s (GSM8K) or operations (generated) against
    ``cuts`` — level = #{c in cuts : s > c} (default: ≤ 2 steps → 0, 3–4 → 1, ≥ 5 → 2).

    Raises WorkloadError (via the loaders) for a missing or malformed source.
    """
    from .generated import generate_problems
    from .workloads import GSM8K_PROMPT, iter_items
    out: list[Levelled] = []
    src = str(source)
    if src.startswith("builtin:arithmetic"):
        n = int(src.partition("n=")[2] or 500)
        for it in generate_problems(n, seed=7):
            steps = it.meta["level"]
            out.append(Levelled(it.key, it.prompt, sum(steps > c for c in cuts)))
    else:
        import json
        with open(src, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if limit is not None and i >= limit:
                    break
                if not line.strip():
                    continue
                rec = json.loads(line)
                steps = gsm8k_steps(rec["answer"])
                out.append(Levelled(f"{Path(src).stem}:{i}", GSM8K_PROMPT.format(question=rec["question"]),
                                    sum(steps > c for c in cuts)))
        if not out:
            list(iter_items(src))  # raises the loader's WorkloadError for an empty or bad file
    return out[:limit] if limit is not None else out


def arrange(pool: list[Levelled], pattern: str, n: int, *, seed: int = 0, shift: float = 0.5,
            burst_len: int = 30, bursts: int = 3, easy_levels: tuple[int, ...] = (0,),
            hard_levels: tuple[int, ...] | None = None) -> tuple[list[Levelled], list[int]]:
    """``n`` items of ``pool`` in a pattern, and the indices where difficulty shifts.

    Patterns: ``easy_hard`` (easy items, then from ``shift``·n on hard ones), ``hard_easy``
    (the reverse), ``bursts`` (easy items with ``bursts`` runs of ``burst_len`` hard items at
    random places), ``mixed`` (easy and hard shuffled, no shift). Easy items have a level in
    ``easy_levels``, hard ones in ``hard_levels`` (default: the highest level of the pool).
    Items are drawn without replacement while they last, then again.

    Raises ValueError for an unknown pattern or a pool with no easy or no hard item.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    rng = random.Random(seed)
    top = max(it.level for it in pool)
    hard_levels = hard_levels if hard_levels is not None else (top,)
    easy = [it for it in pool if it.level in easy_levels]
    hard = [it for it in pool if it.level in hard_levels]
    if not easy or not hard:
        raise ValueError(f"the pool needs items at levels {easy_levels} and {hard_levels}")
    rng.shuffle(easy)
    rng.shuffle(hard)

    def draw(src: list[Levelled], k: int, used: dict) -> list[Levelled]:
        out = []
        for _ in range(k):
            j = used.get(id(src), 0)
            out.append(src[j % len(src)])
            used[id(src)] = j + 1
        return out

    used: dict = {}
    cut = int(round(shift * n))
    if pattern == "easy_hard":
        return draw(easy, cut, used) + draw(hard, n - cut, used), [cut]
    if pattern == "hard_easy":
        return draw(hard, cut, used) + draw(easy, n - cut, used), [cut]
    if pattern == "mixed":
        k = int(round(shift * n))
        items = draw(easy, n - k, used) + draw(hard, k, used)
        rng.shuffle(items)
        return items, []
    starts = sorted(rng.sample(range(burst_len, max(burst_len + 1, n - burst_len), burst_len), bursts))
    flags = [False] * n
    for s in starts:
        for j in range(s, min(n, s + burst_len)):
            flags[j] = True
    items = [draw(hard, 1, used)[0] if f else draw(easy, 1, used)[0] for f in flags]
    marks = sorted({b for s in starts for b in (s, min(n, s + burst_len))})
    return items, marks


def recording(items: list[Levelled], *, tiers: tuple[str, ...] = TIERS, costs: tuple[float, ...] = COSTS,
              noise: float = 0.0, jitter: float = 0.2, seed: int = 0, name: str = "shifted") -> RecordedSet:
    """A :class:`~dreamroute.eval.recorded_set.RecordedSet` of ``items`` in this order (kind ``outcomes``):
    tier i answers item x correctly iff i ≥ level(x) (each grade flipped with probability
    ``noise``); its call costs ``costs[i]`` × U[1 − jitter, 1 + jitter] J (``atp_joules``, no
    token counts). Every answer has the same text, so nothing but the prompt tells a router
    which will be right. A repeated item gets a key of its own (``key#k``).

    Raises ValueError when ``tiers`` and ``costs`` differ in length or a cost is negative.
    """
    if len(tiers) != len(costs) or any(c < 0 for c in costs):
        raise ValueError("recording needs one non-negative cost per tier")
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    out: list[RecordedItem] = []
    for it in items:
        k = seen.get(it.key, 0)
        seen[it.key] = k + 1
        key = it.key if k == 0 else f"{it.key}#{k}"
        calls = {}
        for i, t in enumerate(tiers):
            ok = i >= it.level
            if noise and rng.random() < noise:
                ok = not ok
            atp = costs[i] * (1.0 + jitter * (2.0 * rng.random() - 1.0))
            calls[t] = RecordedCall(t, f"{t}-model", "Here is an answer.", ok,  # the text says nothing
                                    None, None, None, None, round(atp, 4))
        out.append(RecordedItem(key, it.prompt, None, None, calls))
    return RecordedSet(name, "outcomes", list(tiers), out, recorded_digest(list(tiers), out),
                       models={t: f"{t}-model" for t in tiers})


def oracle_accuracy_within(rs: RecordedSet, budget: float) -> tuple[float, float]:
    """The offline optimum (hindsight) within ``budget`` J per request on average: (accuracy,
    ATP per request). Items are answered by their cheapest correct tier, most cost-effective
    first (each correct answer is worth 1, so the cheapest answers are bought first), the
    rest by the cheapest tier; the mean recorded ATP bounds what is bought."""
    cheapest = rs.tiers[0]
    base = sum(it.calls[cheapest].atp_joules or 0.0 for it in rs.items)
    extra = []
    right = 0
    for it in rs.items:
        ok = [t for t in rs.tiers if it.calls[t].correct]
        if not ok:
            continue
        if ok[0] == cheapest:
            right += 1
            continue
        extra.append((it.calls[ok[0]].atp_joules or 0.0) - (it.calls[cheapest].atp_joules or 0.0))
    room = budget * len(rs.items) - base
    spent = base
    for e in sorted(extra):
        if e <= room:
            room -= e
            spent += e
            right += 1
    n = max(1, len(rs.items))
    return right / n, spent / n
