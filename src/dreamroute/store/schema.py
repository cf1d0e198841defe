"""The store's tables as they are after the latest migration, plus the row shapes the store returns.

These SQLAlchemy Core tables are what queries are written against. They are
*not* used to create a database: ``migrations.py`` does that step by step, so
an old file upgrades the same way a new one is built. ``tests/test_store.py``
checks that a migrated database has exactly these tables and columns.
Also here: the row dataclasses the store returns, the experience column
defaults and ``experience_row`` (fills and checks one experience),
``prompt_hash`` and ``utc_now``.

Conventions: every timestamp is a UTC ISO-8601 string
(``2025-01-31T12:00:00.000000+00:00``); durations are seconds; energy (ATP) is
joules; JSON columns hold canonical JSON text (sorted keys, no spaces).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy import (
    CheckConstraint, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint, func,
)

from dreamroute.errors import StoreError

metadata = MetaData()

ROLES = ("chosen", "escalated", "audit")
OUTCOMES = ("success", "failure", "unknown")
STATUSES = ("active", "candidate", "rejected", "retired")
RUN_STATUSES = ("running", "finished")
GENESIS_HASH = "0" * 64

migrations_table = Table(
    "_migrations", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("applied_at", String(40), nullable=False),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", Integer, primary_key=True),
    Column("tier", String(100), nullable=False),
    Column("identity", String(300), nullable=False),   # e.g. "sha256:<gguf digest>" or a remote model id
    Column("name", String(300), nullable=False),
    Column("adapter_path", Text),                       # LoRA adapter (GGUF) on top of the identity; NULL = base
    Column("parent_id", Integer, ForeignKey("model_versions.id")),
    Column("status", String(20), nullable=False),
    Column("created_at", String(40), nullable=False),
    CheckConstraint("status IN ('active','candidate','rejected','retired')", name="ck_model_versions_status"),
)
Index("ux_model_versions_key", model_versions.c.tier, model_versions.c.identity,
      func.coalesce(model_versions.c.adapter_path, ""), unique=True)
Index("ix_model_versions_tier_status", model_versions.c.tier, model_versions.c.status)

trust = Table(
    "trust", metadata,
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), primary_key=True),
    Column("context", String(40), primary_key=True),
    Column("alpha", Float, nullable=False),
    Column("beta", Float, nullable=False),
    Column("count", Float, nullable=False),   # observations (float so a forgetting-weighted count fits)
    Column("updated_at", String(40), nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("workload", Text, nullable=False),
    Column("workload_digest", String(128), nullable=False),
    Column("policy", String(300), nullable=False),
    Column("seed", Integer, nullable=False),
    Column("budget", Float),                  # ATP per request, NULL = unbudgeted
    Column("attempt", Integer, nullable=False),
    Column("status", String(20), nullable=False),
    Column("started_at", String(40), nullable=False),
    Column("finished_at", String(40)),
    UniqueConstraint("workload_digest", "policy", "seed", "attempt", name="uq_runs_key"),
    CheckConstraint("status IN ('running','finished')", name="ck_runs_status"),
)

experiences = Table(
    "experiences", metadata,
    Column("id", Integer, primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id")),
    Column("item_key", String(300)),
    Column("role", String(20), nullable=False),
    Column("conversation_id", String(200)),
    Column("turn", Integer, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("prompt_hash", String(64), nullable=False),
    Column("tier", String(100), nullable=False),
    Column("model_version_id", Integer, ForeignKey("model_versions.id")),
    Column("response", Text, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cached_tokens", Integer, nullable=False),
    Column("prefill_s", Float, nullable=False),
    Column("decode_s", Float, nullable=False),
    Column("latency_s", Float, nullable=False),
    Column("atp_joules", Float, nullable=False),
    Column("mean_logprob", Float),
    Column("confidence", Float),
    Column("context", String(40), nullable=False),
    Column("novelty", Float, nullable=False),
    Column("drift", Float, nullable=False),
    Column("instability", Float),
    Column("surprise", Float),
    Column("snarc_s", Float, nullable=False),
    Column("snarc_n", Float, nullable=False),
    Column("snarc_a", Float, nullable=False),
    Column("snarc_r", Float, nullable=False),
    Column("snarc_c", Float, nullable=False),
    Column("salience", Float, nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("witness", String(200), nullable=False),
    Column("gold", Text),
    Column("predicted", Text),
    Column("priority", Float, nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("surprise_tier", String(100)),            # migration 3: the tier that scored the surprise
    Column("messages_hash", String(64)),             # migration 5: the whole conversation's key (fast path)
    Column("finish_reason", String(20)),             # migration 6: "stop" | "length" (None before it)
    Column("messages_hash_v1", String(64)),          # migration 9: a pre-9 row's whitespace-normalised key
    Column("instance_id", String(64)),               # migration 10: the router instance that stored it
    CheckConstraint("role IN ('chosen','escalated','audit')", name="ck_experiences_role"),
    CheckConstraint("outcome IN ('success','failure','unknown')", name="ck_experiences_outcome"),
)
Index("ix_experiences_run_item", experiences.c.run_id, experiences.c.item_key)
Index("ix_experiences_tier", experiences.c.tier)
Index("ix_experiences_prompt_hash", experiences.c.prompt_hash)
Index("ix_experiences_request", experiences.c.request_id)
Index("ix_experiences_conversation", experiences.c.conversation_id, experiences.c.turn)
Index("ix_experiences_messages_hash", experiences.c.messages_hash)

ledger = Table(
    "ledger", metadata,
    # the entry's id, in commit order per trust row; 1, 2, 3 ... on SQLite; gaps possible on PostgreSQL
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("created_at", String(40), nullable=False),
    Column("entity", String(300), nullable=False),
    Column("action", String(100), nullable=False),
    Column("delta", Text, nullable=False),       # canonical JSON object
    Column("witnesses", Text, nullable=False),   # canonical JSON list of strings
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("instance_id", String(64), nullable=False),   # migration 10: the chain (router instance)
    Column("chain_seq", Integer, nullable=False),        # migration 10: 1, 2, 3 ... within the chain, no gaps
)
Index("ix_ledger_entity", ledger.c.entity, ledger.c.seq)
Index("ux_ledger_chain", ledger.c.instance_id, ledger.c.chain_seq, unique=True)

background_work = Table(                              # migration 3
    "background_work", metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(40), nullable=False),  # "prefill" (warm handoff), "failed_call", "unanswered", "dream"
    Column("tier", String(100), nullable=False),
    Column("model_version_id", Integer, ForeignKey("model_versions.id")),
    Column("conversation_id", String(200)),
    Column("tokens", Integer, nullable=False),         # tokens evaluated
    Column("atp_joules", Float, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id")),
    Column("created_at", String(40), nullable=False),
    Column("status", Integer),                         # migration 7: a failed call's upstream HTTP status
    Column("detail", Text),                            # migration 7: a failed call's backend message
    Column("request_id", String(64)),                  # migration 7: the request a failed call was for
)

dream_cycles = Table(                                 # migration 4
    "dream_cycles", metadata,
    Column("id", Integer, primary_key=True),
    Column("student", String(100), nullable=False),
    Column("teacher", String(100), nullable=False),
    Column("base_version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("version_id", Integer, ForeignKey("model_versions.id")),   # the candidate, once exported
    Column("status", String(20), nullable=False),
    Column("stage", String(40), nullable=False),       # the last stage completed
    Column("workdir", Text, nullable=False),
    Column("config", Text, nullable=False),            # canonical JSON of the DreamConfig
    Column("result", Text, nullable=False),            # canonical JSON, filled stage by stage
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    CheckConstraint("status IN ('running','promoted','rejected','failed')", name="ck_dream_cycles_status"),
)

verdicts = Table(                                     # migration 8: one verdict per response
    "verdicts", metadata,
    Column("experience_id", Integer, ForeignKey("experiences.id"), primary_key=True),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("context", String(40), nullable=False),
    Column("reward", Float, nullable=False),          # the reward this response now holds in trust, [0, 1]
    Column("slot_count", Float, nullable=False),      # the trust row's count right after its observation
    Column("outcome", String(20), nullable=False),
    Column("witness", String(200), nullable=False),
    Column("ledger_seq", Integer, nullable=False),    # the entry that set it (observation or correction)
    Column("updated_at", String(40), nullable=False),
)

calibration = Table(
    "calibration", metadata,
    Column("identity", String(300), primary_key=True),
    Column("tier", String(100), nullable=False),
    Column("values", Text, nullable=False),      # canonical JSON object
    Column("updated_at", String(40), nullable=False),
)

#: experience columns a caller may set (everything but the autoincrement id).
EXPERIENCE_COLUMNS: tuple[str, ...] = tuple(c.name for c in experiences.columns if c.name != "id")

#: defaults for experience columns a caller may leave out of ``Store.record``.
#: ``request_id``, ``prompt_hash`` and ``created_at`` are filled per call instead.
EXPERIENCE_DEFAULTS: dict[str, object] = {
    "run_id": None, "item_key": None, "conversation_id": None, "turn": 0, "model_version_id": None,
    "response": "", "prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
    "prefill_s": 0.0, "decode_s": 0.0, "latency_s": 0.0, "atp_joules": 0.0,
    "mean_logprob": None, "confidence": None, "novelty": 0.0, "drift": 0.0,
    "instability": None, "surprise": None, "snarc_s": 0.0, "snarc_n": 0.0, "snarc_a": 0.0,
    "snarc_r": 0.0, "snarc_c": 0.0, "salience": 0.0, "outcome": "unknown", "witness": "",
    "gold": None, "predicted": None, "priority": 0.0, "surprise_tier": None, "messages_hash": None,
    "finish_reason": None, "messages_hash_v1": None, "instance_id": None,
}

#: experience columns that must be given: nothing sensible can stand in for them.
EXPERIENCE_REQUIRED: tuple[str, ...] = ("role", "prompt", "tier", "context")


def utc_now() -> str:
    """Now as a UTC ISO-8601 string with microseconds (the store's timestamp format)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def prompt_hash(prompt: str) -> str:
    """sha256 hex of the normalised prompt: casefolded, whitespace runs collapsed, ends stripped
    (the same key as ``router.engine.prompt_hash``, the exact-repeat cache key)."""
    norm = " ".join(prompt.casefold().split())
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def experience_row(exp: dict, request_id: str, now: str) -> dict:
    """A full experiences row from a caller's dict: defaults filled, fields checked (StoreError)."""
    unknown = set(exp) - set(EXPERIENCE_COLUMNS)
    if unknown:
        raise StoreError(f"unknown experience fields {sorted(unknown)}; known: {EXPERIENCE_COLUMNS}")
    missing = [k for k in EXPERIENCE_REQUIRED if exp.get(k) is None]
    if missing:
        raise StoreError(f"experience lacks required fields {missing}")
    row = {**EXPERIENCE_DEFAULTS, "request_id": request_id, "created_at": now}
    for k, v in exp.items():          # numpy scalars (np.float32, np.int64) -> Python numbers
        row[k] = v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v
    if row.get("prompt_hash") is None:
        row["prompt_hash"] = prompt_hash(row["prompt"])
    if row["role"] not in ROLES or row["outcome"] not in OUTCOMES:
        raise StoreError(f"experience role {row['role']!r} / outcome {row['outcome']!r} invalid; "
                         f"roles {ROLES}, outcomes {OUTCOMES}")
    return row


@dataclass(frozen=True)
class ModelVersion:
    """One (tier, identity, adapter) row; ``status`` is one of STATUSES."""

    id: int
    tier: str
    identity: str
    name: str
    adapter_path: str | None
    parent_id: int | None
    status: str
    created_at: str


@dataclass(frozen=True)
class TrustRow:
    """Beta(alpha, beta) trust of one model version in one context; ``model`` is the version's name."""

    model_version_id: int
    tier: str
    model: str
    context: str
    alpha: float
    beta: float
    count: float
    updated_at: str

    @property
    def mean(self) -> float:
        """Posterior mean P(success) = alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)


@dataclass
class TrustUpdate:
    """One trust change to write with ``Store.record``.

    ``experience_index`` points into the same call's ``experiences`` list (the
    experience whose outcome caused the change); when it is None the ledger
    entry cites ``experience_id`` instead (an experience stored earlier, e.g.
    for feedback), or nothing. ``witnesses`` name who judged the outcome.

    ``reward`` (in [0, 1]) makes the change the cited experience's verdict, recorded in
    ``verdicts`` (one per response). ``replaces`` marks a changed verdict: the correction of
    an earlier one, ``{"reward", "outcome", "witness", "slot_count", "weight"}`` of the verdict
    taken back (``weight`` = γ^d, its weight in trust now; see ``trust.replace_reward``). Both
    go into the ledger entry's delta.

    ``op`` says how the store computes the new row from the one in the database, inside the
    write transaction and under the row's lock (so concurrent writers never lose an update;
    :mod:`dreamroute.store.trust_rows`):

    * None: set the row to ``alpha_after``, ``beta_after``, ``count_after`` as given;
    * ``"observe"``: one observation of ``reward``: forget by ``gamma`` toward ``prior``, then
      α += r, β += 1 − r, count += 1 (``trust.update``);
    * ``"replace"``: a changed verdict: the cited experience's verdict (its ``verdicts`` row as
      it is in the database, else ``replaces``) is rewritten to ``reward`` with weight
      γ^(count − slot_count) (``trust.replace_reward``); count unchanged.

    In every case the ledger entry carries the row's true before (from the database) and after,
    and once the store call has committed the update holds them: ``alpha_before``,
    ``beta_before``, ``count_before``, ``alpha_after``, ``beta_after``, ``count_after`` (and
    ``replaces`` as applied). The values the caller gave before and after are its estimate.
    """

    model_version_id: int
    context: str
    alpha_before: float
    beta_before: float
    alpha_after: float
    beta_after: float
    count_after: float
    witnesses: list[str] = field(default_factory=list)
    reason: str = ""
    experience_index: int | None = None
    experience_id: int | None = None
    reward: float | None = None
    replaces: dict | None = None
    op: str | None = None
    gamma: float = 1.0
    prior: tuple[float, float] = (1.0, 1.0)
    count_before: float | None = None
