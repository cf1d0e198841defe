"""Witnessed outcomes that arrive after a request was answered (user feedback, a verifier)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import FeedbackConflictError, RequestError
from ..store.store import TrustUpdate
from .memory import OUTCOME_VALUE
from .types import Outcome

if TYPE_CHECKING:
    from .engine import Engine


def feedback_update(engine: Engine, request_id: str, outcome: str | float, witness: str = "user") -> Outcome:
    """A witnessed outcome for a request answered earlier (user feedback, a verifier).

    ``outcome`` is ``"success"``, ``"failure"`` or a rating in [0, 1] (reward;
    ≥ 0.5 counts as success). Updates the answering experience, trust and the
    ledger in one transaction, and the in-memory index and response cache (a
    success makes the answer servable by the fast path, a failure removes it).

    A witness does not repeat itself: the verdict a response already has from ``witness`` is
    refused (repeating it would count one answer many times in trust); a different verdict
    from it (a changed mind, or a fast-path hit of the answer judged otherwise) is taken.

    Raises:
        RequestError: unknown request id, or an outcome that is none of the above.
        FeedbackConflictError: the verdict this witness already gave.
    """
    if isinstance(outcome, str):
        if outcome not in OUTCOME_VALUE:
            raise RequestError(f"outcome must be 'success', 'failure' or a rating in [0, 1], got {outcome!r}")
        reward, label = OUTCOME_VALUE[outcome], outcome
    else:
        reward = float(outcome)
        if not 0.0 <= reward <= 1.0 or math.isnan(reward):
            raise RequestError(f"a rating must be in [0, 1], got {outcome!r}")
        label = "success" if reward >= 0.5 else "failure"
    rows = [r for r in engine.store.experiences_for_request(request_id) if r["role"] != "audit"]
    if not rows:
        raise RequestError(f"no stored response has request id {request_id!r}; pass the id returned with the answer")
    row = rows[-1]
    if row["witness"] == witness and row["outcome"] == label:
        raise FeedbackConflictError(f"response {request_id!r} already has this verdict ({label}) from {witness!r}; "
                           "a repeated verdict is not counted again")
    vid, ctx = row["model_version_id"], row["context"]
    before, after = engine.memory.trust.observe(vid, ctx, reward)
    upd = TrustUpdate(vid, ctx, before.alpha, before.beta, after.alpha, after.beta, after.count, [witness],
                      f"feedback {label}", None, experience_id=row["id"])
    try:
        engine.store.record_outcome(row["id"], label, witness, upd)
    except Exception:
        engine.memory.trust.set(vid, ctx, before)
        raise
    if engine.responses is not None:
        engine.responses.observe_row({**row, "outcome": label, "witness": witness})
    r = engine.memory.exp_rows.get(row["id"])
    if r is not None:
        engine.memory.index.set_outcome(r, OUTCOME_VALUE[label])
    return Outcome(label, witness, reward)
