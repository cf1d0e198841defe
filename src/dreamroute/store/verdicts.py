"""One verdict per response: the reward each judged response holds in trust, and where.

A response (an experience) counts once in its trust row: the observation its first
verdict made (at learn time, or its first feedback). A changed verdict does not add an
observation; it rewrites that one's reward (``trust.replace_reward``), weighted by the
forgetting it has had since: γ^d with d = the trust row's count now minus ``slot_count``
(the count right after the observation; corrections leave the count alone). Any sequence
of verdicts on a response thus leaves trust exactly as if only the last one had been
given, in the place of the first.

``verdicts`` (migration 8) holds, per experience: model version, context, reward, slot
count, outcome, witness and the ledger entry that set it. It is written by the store in
the transaction of the trust update it mirrors (:func:`record_verdicts`). Responses
judged before migration 8 have no row; :func:`ledger_verdict` recovers theirs from the
last ledger entry that cites them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from dreamroute.store.ledger import trust_entity
from dreamroute.store.schema import TrustUpdate, ledger, verdicts


@dataclass(frozen=True)
class Verdict:
    """The verdict a response holds in trust.

    Attributes:
        experience_id: the response.
        model_version_id / context: the trust row it counts in.
        reward: its reward in trust, [0, 1] (1 success, 0 failure, or a rating).
        slot_count: the trust row's observation count right after its observation.
        outcome / witness: ``success`` or ``failure``, and who judged it.
        ledger_seq: the ledger entry that set it (None when recovered from an older entry).
    """

    experience_id: int
    model_version_id: int
    context: str
    reward: float
    slot_count: float
    outcome: str
    witness: str
    ledger_seq: int | None = None


def record_verdicts(conn: Connection, updates: list[TrustUpdate], ids: list[int], seqs: list[int],
                    now: str) -> None:
    """Inside the store's write transaction: make each update that carries a ``reward`` its
    experience's verdict (``ids``: the call's new experience ids that ``experience_index``
    points into; ``seqs``: the ledger entries appended for ``updates``, in order). An update
    with ``replaces`` keeps the slot of the verdict it corrects; a plain one opens a slot at
    its ``count_after``."""
    rows = []
    for u, seq in zip(updates, seqs):
        eid = ids[u.experience_index] if u.experience_index is not None else u.experience_id
        if u.reward is None or eid is None:
            continue
        slot = u.replaces["slot_count"] if u.replaces is not None else u.count_after
        rows.append({"experience_id": eid, "model_version_id": u.model_version_id, "context": u.context,
                     "reward": float(u.reward), "slot_count": float(slot),
                     "outcome": "success" if u.reward >= 0.5 else "failure",
                     "witness": u.witnesses[0] if u.witnesses else "", "ledger_seq": seq, "updated_at": now})
    if rows:
        conn.execute(delete(verdicts).where(verdicts.c.experience_id.in_([r["experience_id"] for r in rows])))
        conn.execute(insert(verdicts), rows)


def verdict_of(store, experience_id: int) -> Verdict | None:
    """The verdict ``experience_id`` holds in trust, from ``verdicts``; None if it has none there."""
    v = verdicts
    with store._read() as conn:
        r = conn.execute(select(v).where(v.c.experience_id == experience_id)).first()
    if r is None:
        return None
    m = r._mapping
    return Verdict(m["experience_id"], m["model_version_id"], m["context"], m["reward"], m["slot_count"],
                   m["outcome"], m["witness"], m["ledger_seq"])


def ledger_verdict(store, experience_id: int, model_version_id: int, context: str, gamma: float,
                   prior: tuple[float, float]) -> Verdict | None:
    """A pre-migration-8 response's verdict, from the last ``trust.update`` entry of its trust
    row that cites it; None when none does (it holds nothing in trust).

    The reward is the entry's own ``reward`` when it has one, else solved from its α before and
    after: α_after = α0 + γ(α_before − α0) + r (``trust.update``), with the γ and prior given
    (the router's; exact as long as they have not changed since), clipped to [0, 1]. Only that
    last contribution can be taken back: flips counted again before migration 8 stay counted.
    """
    entity = trust_entity(model_version_id, context)
    with store._read() as conn:
        rows = conn.execute(select(ledger.c.seq, ledger.c.delta, ledger.c.witnesses)
                            .where(ledger.c.entity == entity).order_by(ledger.c.seq.desc()))
        for seq, raw, wit in rows:
            d = json.loads(raw)
            if d.get("experience_id") != experience_id or "alpha_after" not in d:
                continue
            if isinstance(d.get("reward"), (int, float)):
                r = float(d["reward"])
            else:
                a0 = prior[0]
                r = d["alpha_after"] - (a0 + gamma * (d["alpha_before"] - a0))
            r = min(1.0, max(0.0, r))
            witnesses = json.loads(wit)
            slot = d["replaces"]["slot_count"] if isinstance(d.get("replaces"), dict) else d["count_after"]
            return Verdict(experience_id, model_version_id, context, r, float(slot),
                           "success" if r >= 0.5 else "failure", witnesses[0] if witnesses else "", seq)
    return None
