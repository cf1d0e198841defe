"""Replay selection for a DREAM cycle: which stored experiences teach the student.

From the store's experiences, a cycle takes the teacher tier's answers that
were judged correct by a witness (ground truth, user feedback, or an audit
that agreed), one per prompt (deduplicated by ``prompt_hash``: the most
salient), and ranks them: prompts the student tier got wrong first (that is
what consolidation is for), then by SNARC salience (DESIGN.md). Prompts are
split into training and held-out validation by a seeded hash of the prompt,
so a prompt is never in both and the split does not move when more
experiences arrive. Only first turns of conversations are used (a stored
experience keeps the newest user message, not the turns before it). A success
on record without its response text (an outcome imported from elsewhere, a
response lost) is still selected, with an empty ``response``: the cycle asks
the teacher tier for a fresh one (:meth:`Dreamer.fresh_responses`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

SUCCESS_WITNESSES = ("ground_truth", "user", "audit:")


@dataclass(frozen=True)
class ReplayItem:
    """One teacher answer selected for replay.

    Attributes:
        prompt_hash: the prompt's key (``Store`` prompt hash).
        prompt: the user message.
        response: the teacher's answer, judged correct ("" when the store lacks its text:
            the cycle asks the teacher again).
        experience_id: the teacher experience it came from.
        salience: its SNARC salience in [0, 1].
        student_failed: the student tier answered this prompt and was judged wrong.
        gold: the gold answer when the witness was ground truth, else None.
    """

    prompt_hash: str
    prompt: str
    response: str
    experience_id: int
    salience: float
    student_failed: bool
    gold: str | None = None


@dataclass
class Plan:
    """What a cycle would train and validate on.

    Attributes:
        train / heldout: replay items, most useful first; no prompt in both.
        candidates: teacher answers judged correct before deduplication.
        student_failures: selected prompts the student got wrong.
        missing: selected items whose response text is not stored.
    """

    student: str
    teacher: str
    train: list[ReplayItem] = field(default_factory=list)
    heldout: list[ReplayItem] = field(default_factory=list)
    candidates: int = 0
    student_failures: int = 0
    missing: int = 0

    def summary(self) -> dict:
        return {"student": self.student, "teacher": self.teacher, "candidates": self.candidates,
                "train": len(self.train), "heldout": len(self.heldout),
                "student_failures": self.student_failures, "missing_responses": self.missing}


def witnessed_success(outcome: str | None, witness: str | None) -> bool:
    """A success judged by ground truth, a user, or an agreeing audit."""
    return outcome == "success" and bool(witness) and witness.startswith(SUCCESS_WITNESSES)


def heldout_share(prompt_hash: str, seed: int) -> float:
    """A prompt's position in [0, 1) for the train/held-out split (sha256 of seed and hash)."""
    h = hashlib.sha256(f"{seed}:{prompt_hash}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def plan_replay(store, student: str, teacher: str, *, heldout_fraction: float = 0.2, seed: int = 0,
                max_examples: int | None = None) -> Plan:
    """Select and split the replay set of one cycle (see the module docstring).

    Args:
        store: an open :class:`~dreamroute.store.store.Store`.
        student / teacher: tier names (the teacher should be the bigger tier).
        heldout_fraction: share of prompts kept for validation, in (0, 1).
        seed: seed of the split.
        max_examples: cap on training items (the first ones in rank order).

    Raises:
        ValueError: ``heldout_fraction`` outside (0, 1), or student == teacher.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if student == teacher:
        raise ValueError(f"the student and the teacher are the same tier ({student!r}); pick a bigger teacher")
    cols = ["id", "prompt_hash", "prompt", "response", "tier", "outcome", "witness", "salience", "turn", "gold"]
    best: dict[str, ReplayItem] = {}
    failed: set[str] = set()
    plan = Plan(student, teacher)
    for r in store.experiences(cols):
        if r["turn"]:
            continue
        if r["tier"] == student and r["outcome"] == "failure":
            failed.add(r["prompt_hash"])
        if r["tier"] != teacher or not witnessed_success(r["outcome"], r["witness"]) or not r["prompt"].strip():
            continue
        plan.candidates += 1
        item = ReplayItem(r["prompt_hash"], r["prompt"], r["response"] or "", r["id"],
                          float(r["salience"] or 0.0), False, r["gold"] if r["witness"] == "ground_truth" else None)
        old = best.get(item.prompt_hash)
        # a stored answer beats one the teacher must give again; then the more salient
        if old is None or (bool(item.response.strip()), item.salience) > (bool(old.response.strip()), old.salience):
            best[item.prompt_hash] = item
    items = [ReplayItem(**{**it.__dict__, "student_failed": it.prompt_hash in failed}) for it in best.values()]
    items.sort(key=lambda it: (not it.student_failed, -it.salience, it.experience_id))
    for it in items:
        (plan.heldout if heldout_share(it.prompt_hash, seed) < heldout_fraction else plan.train).append(it)
    if max_examples is not None:
        plan.train = plan.train[:max_examples]
    plan.student_failures = sum(it.student_failed for it in plan.train + plan.heldout)
    plan.missing = sum(not it.response.strip() for it in plan.train + plan.heldout)
    return plan
