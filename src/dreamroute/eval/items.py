"""One request of a workload (:class:`Item`) and the GSM8K prompt: what the workload readers
(:mod:`dreamroute.eval.workloads`) and the problem generator (:mod:`dreamroute.eval.generated`)
both build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GSM8K_PROMPT = "{question}\nSolve step by step, then end with: The answer is N."
"""The user message for a GSM8K-style question, exactly as in local_tiers/README.md."""


@dataclass(frozen=True)
class Item:
    """One request of a workload.

    key: stable id, unique within the workload ("gsm8k:17", "arith:0:4", a record's id).
    prompt: the user message exactly as sent to the model.
    answer: gold answer text, or None when unknown (graded as correct=None).
    grader: a name ``dreamroute.grading.get_grader`` accepts.
    meta: free-form extras (GSM8K: {"index": i}; generated: {"level", "start", "steps", ...}).
    """

    key: str
    prompt: str
    answer: str | None
    grader: str
    meta: dict = field(default_factory=dict, hash=False)
