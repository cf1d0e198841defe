"""Requests, decisions, calls and answers: the values that flow through the router."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

from ..backends.base import CancelCheck, GenOptions, Generation, Message
from ..signals.features import Signals

ROLES = ("chosen", "escalated", "audit")


@dataclass
class Request:
    """One request to the hierarchy.

    Attributes:
        messages: the conversation so far, ending with the user's turn.
        conversation_id: groups turns of one conversation (drift, KV cache).
        priority: arousal in [0, 1] (explicit field or header; 0 by default).
        max_tokens: generation limit per call.
        grader: name of the answer form expected (``gsm8k``, ``choice``,
            ``exact``); used only to judge a response's form for confidence.
            The gold answer never travels with the request.
        item_key: workload item this request answers, if any.
        tier: force this tier (the server's ``model: TIER``): the request is answered as
            policy ``always:TIER`` would (no escalation, no audit), whatever the engine's policy.
        options: stop strings, logprobs, a JSON mode (:class:`~dreamroute.backends.base.GenOptions`);
            every call made for the request (chosen, escalated, audit) is generated with them.
        cancel: polled by the backends before each call and between tokens; True stops the
            request with :class:`~dreamroute.errors.GenerationCancelled`, nothing of it
            recorded as an answer (the server's: the client disconnected).
        on_text: for a request that names a tier (``tier``): called, in the engine's thread, with
            each new piece of the answer's text as it is generated (the pieces join to the final
            text; nothing a stop string later removes is sent). Ignored for a routed request,
            whose first answer an escalation may replace (the server streams it once complete).
        queue_timeout_s: longest the request waits for tiers' turns, all waits together, s
            (:class:`~dreamroute.router.gate.TierGate`; past it, TierBusyError); None: no limit
            beyond the queues' bounds.
    """

    messages: list[Message]
    conversation_id: str | None = None
    priority: float = 0.0
    max_tokens: int = 320
    grader: str | None = None
    item_key: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tier: str | None = None
    options: GenOptions = field(default_factory=GenOptions)
    cancel: CancelCheck | None = None
    on_text: Callable[[str], None] | None = None
    queue_timeout_s: float | None = None

    @classmethod
    def from_prompt(cls, prompt: str, **kw) -> "Request":
        return cls(messages=[{"role": "user", "content": prompt}], **kw)

    @property
    def prompt(self) -> str:
        """The newest user message."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return m.get("content", "")
        return ""

    @property
    def turn(self) -> int:
        return sum(1 for m in self.messages if m.get("role") == "user") - 1


@dataclass
class Decision:
    """What a policy committed to before any model answered.

    Attributes:
        tier: the first tier to call.
        p_hat: estimated P(success | x) per tier (posterior means).
        expected_atp: expected ATP per tier, J.
        lam: the budget multiplier λ used.
        audit: whether a higher tier should also answer.
        overhead_ms: wall time spent deciding (model time excluded), ms.
        overhead_cpu_ms: CPU time of this thread spent deciding (model time
            excluded), ms: the same work without the waits a shared machine adds.
    """

    request_id: str
    policy: str
    tier: str
    signals: Signals
    p_hat: dict[str, float] = field(default_factory=dict)
    expected_atp: dict[str, float] = field(default_factory=dict)
    lam: float = 0.0
    audit: bool = False
    explored: bool = False
    overhead_ms: float = 0.0
    overhead_cpu_ms: float = 0.0

    @property
    def context(self) -> str:
        return self.signals.context


@dataclass
class Call:
    """One model call made for a request.

    Attributes:
        role: ``chosen`` (first call), ``escalated`` (after low confidence) or ``audit``.
        atp: ATP charged, J.
        confidence: in [0, 1]: exp(mean token logprob) × (1 if the answer is
            stated in the expected form else 0.5); None with no signal.
        predicted: the final answer extracted by the request's grader, if any.
    """

    tier: str
    role: str
    generation: Generation
    atp: float
    confidence: float | None
    predicted: str | None = None
    model_version_id: int | None = None

    @property
    def text(self) -> str:
        return self.generation.text


@dataclass(frozen=True)
class FailedCall:
    """A call whose backend failed (BackendError or a timeout): recorded, charged no ATP.

    Attributes:
        tier / role: the tier called and why (``chosen``, ``escalated``, ``audit``, or
            ``surprise``: scoring the prompt, which an overloaded upstream refused).
        error: the backend's message.
        seconds: wall time the failed call took.
        request_id: the request it was made for.
        status: the upstream HTTP status, None for a local failure or a timeout.
        cooled_s: how long the tier is skipped after it (its Retry-After, else the
            configured cooldown), s; 0.0 when it is not skipped.
    """

    tier: str
    role: str
    error: str
    seconds: float
    request_id: str
    status: int | None = None
    cooled_s: float = 0.0

    def to_dict(self) -> dict:
        """``{tier, role, status, message, cooled_s}``: the server's ``failed_tiers`` entry."""
        return {"tier": self.tier, "role": self.role, "status": self.status, "message": self.error,
                "cooled_s": round(self.cooled_s, 3)}


@dataclass
class Answer:
    """A request's result: the decision, every call, and the answering call."""

    request: Request
    decision: Decision
    calls: list[Call]
    surprise_atp: float = 0.0
    outcomes: list["Outcome"] | None = None  # set once judged (DreamRoute.complete)
    surprise_tier: str | None = None  # the tier whose log-likelihood gave the surprise
    surprise_s: float = 0.0  # seconds of surprise scoring (for a follow-up: the new tokens' prefill)
    kv: dict = field(default_factory=dict)  # tier → cache.reuse.Restore, for conversation turns
    failures: list[FailedCall] = field(default_factory=list)  # calls that failed and fell back
    metabolic_state: str | None = None  # the metabolic state it was routed in (with a controller)

    @property
    def kv_restored(self) -> bool:
        """Whether the answering tier reused a stored KV state of the conversation."""
        r = self.kv.get(self.tier)
        return bool(r and r.hit)

    @property
    def final(self) -> Call:
        """The call whose text answers the request (the last non-audit call)."""
        return [c for c in self.calls if c.role != "audit"][-1]

    @property
    def text(self) -> str:
        return self.final.text

    @property
    def tier(self) -> str:
        return self.final.tier

    @property
    def atp(self) -> float:
        """Total ATP of the request: every call plus surprise scoring, J."""
        return sum(c.atp for c in self.calls) + self.surprise_atp

    @property
    def escalated(self) -> bool:
        return any(c.role == "escalated" for c in self.calls)

    @property
    def audited(self) -> bool:
        return any(c.role == "audit" for c in self.calls)


@dataclass(frozen=True)
class Outcome:
    """The judged outcome of one call: ``success`` | ``failure`` | ``unknown`` and its witness."""

    outcome: str
    witness: str
    reward: float | None = None
    gold: str | None = None
    predicted: str | None = None
