"""Request and response bodies of the server, in OpenAI's shapes (plus dreamroute's extensions).

Chat completions follow OpenAI's ``/v1/chat/completions``: a request carries
``model`` (a tier name, or ``dreamroute`` to route), ``messages`` (``system``,
``developer`` (read as ``system``), ``user``, ``assistant``; content a string or
a list of text parts), ``max_tokens`` / ``max_completion_tokens``, ``stream``,
``stream_options.include_usage`` and ``user``; ``temperature``, ``top_p``,
``seed`` and ``stop`` are accepted and ignored (the tiers decode greedily), and
other OpenAI fields are ignored. Extensions: ``conversation_id`` (reuse the
conversation's KV state) and ``priority`` in [0, 1] (arousal).
A response is OpenAI's ``chat.completion`` (or ``chat.completion.chunk`` events)
with a ``dreamroute`` object saying who answered, in which context, at what ATP.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator


def _encodable(text: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate from a ``\\ud800`` JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode ({e.reason} at position {e.start}); "
                         "send UTF-8 text without unpaired surrogates") from None
    return text


class TextPart(BaseModel):
    """One part of a message's content; only text is supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid(cls, v: str) -> str:
        return _encodable(v)


class ChatMessage(BaseModel):
    """One chat message (``name`` and other OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _valid(cls, v):
        return _encodable(v) if isinstance(v, str) else v

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="only one choice is generated")
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=256)
    conversation_id: str | None = Field(None, min_length=1, max_length=200)
    priority: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    def chat(self) -> list[dict[str, str]]:
        """The messages as the router takes them: ``[{"role", "content"}]`` (developer → system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def limit(self, default: int) -> int:
        """The generation limit asked for: ``max_completion_tokens``, else ``max_tokens``, else ``default``."""
        return self.max_completion_tokens or self.max_tokens or default


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: how a response turned out, as exactly one of ``outcome`` or ``rating``.

    Attributes:
        id: the response id (``chatcmpl-...``) or its ``dreamroute.request_id``.
        outcome: ``success`` or ``failure``.
        rating: a reward in [0, 1] (>= 0.5 counts as a success).
    """

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)
    outcome: Literal["success", "failure"] | None = None
    rating: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self) -> "FeedbackRequest":
        if (self.outcome is None) == (self.rating is None):
            raise ValueError("give exactly one of outcome ('success' or 'failure') or rating (0..1)")
        return self


class DreamrouteInfo(BaseModel):
    """Who answered and what it cost.

    Attributes:
        request_id: the request's id (feedback takes it, or the response id).
        tier / context: the answering tier, the request's context (a fast-path hit: the cached
            answer's).
        atp_joules: ATP of every call plus surprise scoring, J (0 for a fast-path hit).
        surprise_atp_joules: of which surprise scoring (the prompt's log-likelihood under a tier), J.
        fast_path: answered from the response cache.
        kv_restored: the answering tier reused the conversation's stored KV state.
        escalated / audited: a higher tier was asked after a weak answer / to check it.
        calls: each model call: ``{tier, role, atp_joules}``.
        failed_tiers: tiers whose backend failed for this request (it fell back).
        cached_from: for a fast-path hit, the request that produced the answer.
        conversation_id: the conversation the request was filed under (explicit or derived).
        metabolic_state: the metabolic state it was routed in (WAKE, FOCUS, CRISIS ...), when
            the server runs a metabolic controller.
    """

    request_id: str
    tier: str
    context: str
    atp_joules: float
    fast_path: bool = False
    kv_restored: bool = False
    escalated: bool = False
    audited: bool = False
    calls: list[dict] = Field(default_factory=list)
    surprise_atp_joules: float = 0.0
    metabolic_state: str | None = None
    failed_tiers: list[str] = Field(default_factory=list)
    cached_from: str | None = None
    conversation_id: str | None = None


class Usage(BaseModel):
    """Tokens of every model call made for the request (escalations and audits included)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict = Field(default_factory=dict)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str = "stop"
    logprobs: None = None


class ChatCompletion(BaseModel):
    """OpenAI's ``chat.completion``, with ``dreamroute``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    dreamroute: DreamrouteInfo


def chunk(id: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
          **extra) -> dict:
    """One ``chat.completion.chunk`` event body; ``delta=None`` gives OpenAI's usage-only chunk
    (empty ``choices``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, **extra}


class MetabolicRequest(BaseModel):
    """``POST /v1/metabolic``: set or clear the explicit crisis flag (CRISIS sends every request to
    the top tier, whatever the budget, until cleared)."""

    model_config = ConfigDict(extra="forbid")
    crisis: StrictBool
