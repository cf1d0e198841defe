"""What a conversation's next turn needs from the store after a restart.

The engine keeps, per conversation, the tier that served its last turn (the tier
whose KV state the reality cache holds and that scores the next turn's surprise)
and that turn's prompt (for drift) in memory. Both are already stored with every
answer: the experience rows carry ``conversation_id``, ``tier``, ``role`` and
``prompt`` (migration 1), so nothing new is written; :func:`last_answer` reads them
back (index ``ix_experiences_conversation``), once per conversation and process.
"""

from __future__ import annotations

from sqlalchemy import select

from dreamroute.store.schema import experiences


def last_answer(store, conversation_id: str) -> dict | None:
    """The conversation's last stored answer (its latest non-audit experience: the call whose
    text answered the turn) as ``{"tier", "prompt", "turn", "model_version_id", "request_id"}``,
    or None when the store has no turn of it. Raises StoreError on a failed read."""
    e = experiences
    stmt = (select(e.c.tier, e.c.prompt, e.c.turn, e.c.model_version_id, e.c.request_id)
            .where(e.c.conversation_id == conversation_id, e.c.role != "audit")
            .order_by(e.c.id.desc()).limit(1))
    with store._read() as conn:
        row = conn.execute(stmt).first()
    return dict(row._mapping) if row is not None else None
