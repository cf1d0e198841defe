"""Witnessed outcomes that arrive after a request was answered (user feedback, a verifier)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..errors import FeedbackConflictError, RequestError
from ..store.store import TrustUpdate
from ..store.verdicts import Verdict, ledger_verdict, verdict_of
from ..signals.trust import TrustState
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

    One verdict per response: the response counts once in trust. Its first verdict (a grade
    at learn time, or the first feedback) is an observation; a later, different verdict (a
    changed mind, another witness, a fast-path hit of the answer judged otherwise) replaces
    it: the earlier reward's contribution, as it stands now after forgetting (γ^d, d the
    trust updates of that row since), is taken back and the new one put in its place
    (``trust.replace_reward``), in a ledger entry of its own (reason ``feedback X replaces
    Y by W``, delta ``replaces``). No forgetting step, no added count: any sequence of
    verdicts leaves trust exactly as if only the last had been given, where the first was.
    The outcome the response already holds from the same witness is refused, whatever the
    rating (an API contract: ``feedback_exists``); to move a rating within one outcome, give
    the other outcome first.

    Raises:
        RequestError: unknown request id, or an outcome that is none of the above.
        FeedbackConflictError: the outcome this witness already gave (success or failure).
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
    vid, ctx = row["model_version_id"], row["context"]
    held = _held(engine, row) if vid is not None else None
    said = (held.witness, held.outcome) if held is not None else (row["witness"], row["outcome"])
    repeated = said == (witness, label)
    if repeated:
        raise FeedbackConflictError(f"response {request_id!r} already has this verdict ({label}) from {witness!r}; "
                           "a repeated verdict is not counted again")
    book = engine.memory.trust
    if held is not None:
        vid, ctx = held.model_version_id, held.context
    if vid is not None and not book.known(vid, ctx) and (stored := engine.store.get_trust(vid, ctx)) is not None:
        book.set(vid, ctx, TrustState(stored.alpha, stored.beta, stored.count))  # e.g. a retired version's
    if held is None:
        before, after = book.observe(vid, ctx, reward)
        replaces, reason = None, f"feedback {label}"
    else:
        steps = max(0.0, book.get(vid, ctx).count - held.slot_count)
        before, after = book.replace(vid, ctx, held.reward, reward, steps)
        replaces = {"reward": held.reward, "outcome": held.outcome, "witness": held.witness,
                    "slot_count": held.slot_count, "weight": book.gamma ** steps}
        reason = f"feedback {label} replaces {held.outcome} by {held.witness}"
    # the store recomputes it from the row under its lock (and replaces a verdict another router gave meanwhile)
    upd = TrustUpdate(vid, ctx, before.alpha, before.beta, after.alpha, after.beta, after.count, [witness],
                      reason, None, experience_id=row["id"], reward=reward, replaces=replaces,
                      op="observe" if held is None else "replace", gamma=book.gamma, prior=book.prior)
    try:
        engine.store.record_outcome(row["id"], label, witness, upd)
    except Exception:
        engine.memory.trust.set(vid, ctx, before)
        raise
    book.set_written([upd])
    if engine.responses is not None:
        engine.responses.observe_row({**row, "outcome": label, "witness": witness})
    r = engine.memory.exp_rows.get(row["id"])
    if r is not None:
        engine.memory.index.set_outcome(r, OUTCOME_VALUE[label])
    return Outcome(label, witness, reward)


def _held(engine: Engine, row: dict) -> Verdict | None:
    """The verdict the response ``row`` holds in trust: its ``verdicts`` row, else (judged before
    migration 8) the one its last ledger entry made, else None (nothing in trust yet)."""
    v = verdict_of(engine.store, row["id"])
    if v is None and row["outcome"] in OUTCOME_VALUE:
        book = engine.memory.trust
        v = ledger_verdict(engine.store, row["id"], row["model_version_id"], row["context"], book.gamma, book.prior)
    return v
