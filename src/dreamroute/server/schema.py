"""Request and response bodies of the server, in OpenAI's shapes (plus dreamroute's extensions).

Chat completions follow OpenAI's ``/v1/chat/completions``: a request carries
``model`` (a tier name, or ``dreamroute`` to route), ``messages`` (``system``,
``developer`` (read as ``system``), ``user``, ``assistant``; content a string or
a list of text parts), ``max_tokens`` / ``max_completion_tokens``, ``stream``,
``stream_options.include_usage`` and ``user``; ``stop`` (a string or up to 4),
``logprobs`` / ``top_logprobs`` (0–20) and ``response_format`` (``text``,
``json_object``, ``json_schema``) are honoured by every call made for the request
(:meth:`ChatCompletionRequest.options`); ``temperature``, ``top_p`` and ``seed`` are
accepted and ignored (the tiers decode greedily). Fields the tiers cannot honour
are refused with a 400 naming them (:data:`REFUSED`): ``n`` > 1, ``tools`` /
``tool_choice`` / ``functions`` / ``function_call`` (unless the choice is
``"none"``), ``logit_bias``, non-zero ``presence_penalty`` / ``frequency_penalty``,
``audio``, non-text ``modalities``, ``prediction``. Fields OpenAI does not define
are ignored. Extensions: ``conversation_id`` (reuse the conversation's KV state)
and ``priority`` in [0, 1] (arousal).
A response is OpenAI's ``chat.completion`` (or ``chat.completion.chunk`` events)
with a ``dreamroute`` object saying who answered, in which context, at what ATP.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

from ..backends.base import GenOptions
from ..errors import OptionError


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


def _tool_use(choice_field: str):
    """A refusal test: the tool list is non-empty and the choice is not ``"none"``."""
    return lambda v, body: bool(v) and getattr(body, choice_field) != "none"


REFUSED: dict[str, tuple] = {
    "tools": (_tool_use("tool_choice"), "the tiers do not call tools; send tool_choice 'none' or no tools"),
    "tool_choice": (lambda v, body: v is not None and v != "none", "the tiers do not call tools; only 'none' is "
                                                                   "accepted"),
    "functions": (_tool_use("function_call"), "the tiers do not call functions"),
    "function_call": (lambda v, body: v is not None and v != "none", "the tiers do not call functions; only "
                                                                     "'none' is accepted"),
    "logit_bias": (lambda v, body: bool(v), "logit bias is not supported"),
    "presence_penalty": (lambda v, body: v not in (None, 0, 0.0), "only 0 is supported (no penalties)"),
    "frequency_penalty": (lambda v, body: v not in (None, 0, 0.0), "only 0 is supported (no penalties)"),
    "audio": (lambda v, body: v is not None, "the tiers answer in text only"),
    "modalities": (lambda v, body: v is not None and v != ["text"], "the tiers answer in text only: ['text']"),
    "prediction": (lambda v, body: v is not None, "predicted outputs are not supported"),
}
"""OpenAI request fields the tiers cannot honour: field → (refused(value, body), why). A request
with such a field in use is answered 400 with ``param`` naming it (:meth:`ChatCompletionRequest.options`)."""

_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``.

    ``stop``, ``logprobs``, ``top_logprobs`` and ``response_format`` are checked here (a 400
    naming the field); :meth:`options` turns them into the engine's
    :class:`~dreamroute.backends.base.GenOptions` and refuses the :data:`REFUSED` fields in use.
    """

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: StrictInt | None = None
    seed: int | None = None
    stop: Any = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    user: str | None = Field(None, max_length=256)
    conversation_id: str | None = Field(None, min_length=1, max_length=200)
    priority: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v is not None and v != 1:
            raise ValueError(f"n must be 1, got {v}: the tiers decode greedily, so {v} choices would be {v} "
                             "identical answers; send n = 1 (or none)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise ValueError("stop must be a string or a list of up to 4 strings")
        if len(stops) > 4:
            raise ValueError(f"stop takes at most 4 strings, got {len(stops)}")
        if any(not x for x in stops):
            raise ValueError("stop strings must not be empty")
        for x in stops:
            _encodable(x)
        return stops or None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is None:
            return None
        kind = v.get("type") if isinstance(v, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format must be {'type': 'text' | 'json_object' | 'json_schema'}, got "
                             f"{v!r:.200}")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                    or not _SCHEMA_NAME.match(spec["name"]):
                raise ValueError("response_format.json_schema needs a 'name' of 1-64 letters, digits, '_' or '-'")
            if not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
            if not isinstance(spec.get("strict", False), (bool, type(None))):
                raise ValueError("response_format.json_schema.strict must be a boolean")
        return v

    def options(self) -> GenOptions:
        """The generation options every call for this request is made with.

        Raises:
            OptionError: a :data:`REFUSED` field in use, or ``top_logprobs`` > 0 without
                ``logprobs: true`` (``param`` names the field).
        """
        for name, (refused, why) in REFUSED.items():
            if refused(getattr(self, name), self):
                raise OptionError(f"{name} is not supported by this server: {why}.", name)
        if self.top_logprobs and not self.logprobs:
            raise OptionError("top_logprobs needs logprobs: true.", "top_logprobs")
        fmt = self.response_format if self.response_format and self.response_format["type"] != "text" else None
        return GenOptions(tuple(self.stop or ()), bool(self.logprobs), self.top_logprobs or 0, fmt)

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
        outcome: ``success`` or ``failure`` (a string).
        rating: a reward in [0, 1], a JSON number (>= 0.5 counts as a success); not a
            boolean or a string.
    """

    model_config = ConfigDict(extra="forbid")
    # strict: a number is not an id, and true or "0.7" is not a rating (each such field gets a 400)
    id: StrictStr = Field(min_length=1, max_length=256)
    outcome: Literal["success", "failure"] | None = None
    rating: StrictFloat | None = Field(None, ge=0, le=1, allow_inf_nan=False)

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
        failed_tiers: each call whose backend failed for this request (it fell back, or an audit
            was dropped): ``{tier, role, status, message, cooled_s}`` (``status``: the upstream
            HTTP status or null; ``message``: the backend's; ``cooled_s``: how long the tier is
            skipped now).
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
    failed_tiers: list[dict] = Field(default_factory=list)
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
    logprobs: dict | None = None  # {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}


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
          logprobs: dict | None = None, **extra) -> dict:
    """One ``chat.completion.chunk`` event body; ``delta=None`` gives OpenAI's usage-only chunk
    (empty ``choices``); ``logprobs``: the chunk's tokens (``{"content": [...], "refusal": None}``)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish_reason}]
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, **extra}


class MetabolicRequest(BaseModel):
    """``POST /v1/metabolic``: set or clear the explicit crisis flag (CRISIS sends every request to
    the top tier, whatever the budget, until cleared)."""

    model_config = ConfigDict(extra="forbid")
    crisis: StrictBool
