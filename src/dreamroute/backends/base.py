"""The backend protocol: one interface for every way of running a model.

Every backend (llama.cpp in process, an OpenAI-compatible HTTP server, the
scripted test backend, the replay backend) implements :class:`Backend`; the
conformance suite in ``tests/test_backend_conformance.py`` runs over each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

Message = dict[str, str]
"""One chat message, ``{"role": "user" | "assistant" | "system", "content": str}``."""

CancelCheck = Callable[[], bool]
"""Polled by a backend before it starts and between generated tokens; True stops the call with
:class:`~dreamroute.errors.GenerationCancelled` (the server's: the client disconnected)."""

MAX_STOP = 4
"""Most stop strings one call takes (OpenAI's limit)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per token ``top_logprobs`` may ask for (OpenAI's limit)."""


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences (KV prefix reuse)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability, in OpenAI's ``logprobs.content`` layout.

    Attributes:
        token: the token's text (UTF-8 decoded; a token holding part of a multi-byte
            character decodes to what is complete, its ``bytes`` hold all of it).
        bytes: the token's bytes; the bytes of a generation's tokens, concatenated, begin
            with its text's UTF-8 (equal to it unless a stop string cut a token).
        logprob: natural-log probability under the model's own (untempered, unconstrained)
            distribution, ``<= 0``.
        top_logprobs: the most likely tokens at this position, most likely first (each with
            no alternatives of its own); ``()`` unless ``top_logprobs`` was asked.
    """

    token: str
    bytes: bytes
    logprob: float
    top_logprobs: tuple["TokenLogprob", ...] = ()

    def to_openai(self, top: bool = True) -> dict:
        """``{"token", "logprob", "bytes": [int, ...], "top_logprobs": [...]}`` (OpenAI's shape;
        without ``top_logprobs`` for an alternative, ``top=False``)."""
        out = {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes)}
        if top:
            out["top_logprobs"] = [t.to_openai(top=False) for t in self.top_logprobs]
        return out


@dataclass(frozen=True)
class GenOptions:
    """What a request asks of generation beyond the prompt and ``max_tokens``.

    Attributes:
        stop: up to :data:`MAX_STOP` non-empty strings; the text ends before the earliest one
            generated (``finish_reason`` ``"stop"``), which is not part of it.
        logprobs: return each generated token with its log-probability
            (:attr:`Generation.token_details`).
        top_logprobs: 0 to :data:`MAX_TOP_LOGPROBS` most likely alternatives per token (needs
            ``logprobs``).
        response_format: OpenAI's shape: ``None`` or ``{"type": "text"}`` (free text),
            ``{"type": "json_object"}`` (a JSON object), ``{"type": "json_schema",
            "json_schema": {"name": ..., "schema": {...}}}`` (JSON following the schema).
    """

    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict | None = None

    @property
    def json_mode(self) -> bool:
        """True when ``response_format`` asks for JSON (``json_object`` or ``json_schema``)."""
        return bool(self.response_format) and self.response_format.get("type") in ("json_object", "json_schema")

    @property
    def shapes_text(self) -> bool:
        """True when the options change the text generated (stop strings or a JSON mode): such an
        answer is not the answer to the plain messages (the fast path never serves it)."""
        return bool(self.stop) or self.json_mode

    @property
    def plain(self) -> bool:
        """True when nothing beyond the defaults is asked."""
        return not (self.shapes_text or self.logprobs or self.top_logprobs)

    def kwargs(self) -> dict:
        """The keyword arguments of :meth:`Backend.generate` for these options, only those that
        differ from the defaults (so a backend that predates them still takes a plain call)."""
        out: dict = {}
        if self.stop:
            out["stop"] = list(self.stop)
        if self.logprobs or self.top_logprobs:
            out["logprobs"] = True
        if self.top_logprobs:
            out["top_logprobs"] = self.top_logprobs
        if self.json_mode:
            out["response_format"] = self.response_format
        return out


@dataclass(frozen=True)
class Generation:
    """The result of one generation call.

    Attributes:
        text: the completion text.
        prompt_tokens: tokens in the prompt as the model saw it (chat template included).
        completion_tokens: tokens generated.
        token_logprobs: natural-log probability of each generated token, length
            ``completion_tokens``; ``None`` where the backend gives none.
        prefill_s: seconds spent evaluating the prompt (time to first token).
        decode_s: seconds spent generating after the first token.
        finish_reason: ``"stop"`` or ``"length"``.
        cached_tokens: prompt tokens that were not evaluated because a KV state
            already held them (llama.cpp prefix reuse or a restored state).
        model: identity of the model that answered.
        token_details: with ``logprobs``, the tokens of ``text`` (:class:`TokenLogprob`: text,
            bytes, logprob, alternatives); tokens generated after a stop string began are left
            out, so there may be fewer than ``completion_tokens``. ``None`` otherwise.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: list[float] | None
    prefill_s: float
    decode_s: float
    finish_reason: str = "stop"
    cached_tokens: int = 0
    model: str = ""
    extra: dict = field(default_factory=dict)
    token_details: list[TokenLogprob] | None = None

    @property
    def seconds(self) -> float:
        """Wall seconds of the call, prefill plus decode."""
        return self.prefill_s + self.decode_s

    @property
    def mean_logprob(self) -> float | None:
        """Mean natural-log probability per generated token, ``None`` if unknown.

        A backend without per-token logprobs (``token_logprobs is None``) may give
        the mean itself as ``extra["mean_logprob"]`` (a recorded source does).
        """
        if self.token_logprobs is None:
            v = self.extra.get("mean_logprob")
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
        if not self.token_logprobs:
            return None
        vals = [v for v in self.token_logprobs if v is not None and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None


@runtime_checkable
class Backend(Protocol):
    """What the router needs from a model runner.

    Attributes:
        identity: a string that names the exact weights (a GGUF sha256, or
            ``url#model`` for a server); KV states and trust are keyed by it.
    """

    identity: str

    def generate(self, messages: list[Message], *, max_tokens: int = 320,
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, response_format: dict | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer a chat.

        Args:
            stop / logprobs / top_logprobs / response_format: as :class:`GenOptions` says; a
                backend honours each or raises :class:`~dreamroute.errors.OptionError` naming it.
            cancel: polled before the call starts and between generated tokens; when it
                returns True the call stops within a token and raises
                :class:`~dreamroute.errors.GenerationCancelled` (with what it had done).
            on_text: called (in the calling thread) with each new piece of text as it is
                generated; the pieces join to the returned ``text``, and no text a stop string
                later removes is ever sent (a tail as long as the longest stop string is held
                back: :class:`~dreamroute.backends.options.TextEmitter`). A backend that cannot
                stream calls it once with the whole text. A call that fails or is cancelled
                may have sent part of its text first.

        Raises:
            BackendError: the backend failed.
            OptionError: an option is out of range or cannot be honoured by this backend.
            GenerationCancelled: ``cancel`` said stop.
        """
        ...

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Natural-log probability of each prompt token after the first, under the
        model's chat template (length ``prompt_tokens - 1``); with ``new_only``, only
        of the tokens after the prefix the backend's KV state already holds (a new
        turn). Used for surprise."""
        ...

    def prompt_tokens(self, messages: list[Message]) -> list:
        """The prompt's tokens under the chat template (what generate() evaluates).
        Raises BackendError where there is no token-level access."""
        ...

    def held_tokens(self) -> list:
        """The tokens the KV state holds now ([] when none)."""
        ...

    def settle(self) -> int:
        """Make the held state equal to what a cold prefill of the same tokens computes
        (re-evaluate cells decoded one token at a time); returns the tokens re-evaluated."""
        ...

    def state_tokens(self, state: bytes) -> list:
        """The tokens a :meth:`save_state` result holds, without loading it. Raises
        BackendError for a damaged state or one made by another model."""
        ...

    def save_state(self) -> bytes:
        """Serialise the model's current KV state (and the tokens it holds)."""
        ...

    def load_state(self, state: bytes) -> None:
        """Restore a state from :meth:`save_state`. Raises BackendError when the
        state was made by another model or is damaged."""
        ...

    def close(self) -> None:
        """Release the model's memory. The backend may reload on the next call."""
        ...
