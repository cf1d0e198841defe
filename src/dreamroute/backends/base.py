"""The backend protocol: one interface for every way of running a model.

Every backend (llama.cpp in process, an OpenAI-compatible HTTP server, the
scripted test backend, the replay backend) implements :class:`Backend`; the
conformance suite in ``tests/test_backend_conformance.py`` runs over each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Message = dict[str, str]
"""One chat message, ``{"role": "user" | "assistant" | "system", "content": str}``."""


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences (KV prefix reuse)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
                 temperature: float = 0.0, seed: int = 0) -> Generation:
        """Answer a chat. Raises :class:`~dreamroute.errors.BackendError` on failure."""
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
