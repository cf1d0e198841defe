"""The few named errors dreamroute raises; each message says what was wrong and how to fix it."""

from __future__ import annotations


class DreamrouteError(Exception):
    """Base class: every error dreamroute raises on purpose derives from it."""


class ConfigError(DreamrouteError):
    """A configuration file, flag or environment variable is invalid."""


class UnknownTierError(ConfigError):
    """A tier name does not exist in the hierarchy.

    Args:
        name: the tier asked for.
        known: the tiers the hierarchy has.
    """

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = list(known)
        super().__init__(
            f"unknown tier {name!r}; this hierarchy has: {', '.join(known) or '(none)'}. "
            "Name one of those, or add the tier to your config (--config FILE)."
        )


class RequestError(DreamrouteError, ValueError):
    """A request or a reported outcome is invalid (empty prompt, unknown request id, bad rating)."""


class FeedbackConflictError(RequestError):
    """A witness repeats the verdict a response already has from it (it would count twice in trust)."""


class OptionError(RequestError):
    """A generation option is invalid, or the backend asked cannot honour it (the server: 400).

    Args:
        message: what was wrong and how to fix it.
        param: the request field at fault (``stop``, ``top_logprobs``, ``response_format`` ...).
    """

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class GenerationCancelled(DreamrouteError):
    """A generation was stopped because its cancel check said so (the client went away).

    Not a :class:`BackendError`: the backend did not fail, so the router neither falls back
    nor cools the tier down, and nothing of the request is recorded as an answer.

    Args:
        prompt_tokens / completion_tokens / cached_tokens: what the stopped call had
            evaluated and generated when it stopped (0 when it stopped before starting).
        seconds: wall seconds the stopped call ran.

    Attributes:
        tier: the tier whose call was stopped (set by the engine; None otherwise).
        atp: ATP spent on the request before it stopped, J (set by the engine).
        queued: True when it stopped while waiting for a tier's turn (the call never started).
    """

    def __init__(self, message: str = "generation cancelled: the client went away", *,
                 prompt_tokens: int = 0, completion_tokens: int = 0, cached_tokens: int = 0,
                 seconds: float = 0.0):
        super().__init__(message)
        self.prompt_tokens = int(prompt_tokens)
        self.completion_tokens = int(completion_tokens)
        self.cached_tokens = int(cached_tokens)
        self.seconds = float(seconds)
        self.tier: str | None = None
        self.atp = 0.0
        self.queued = False


class ModelFileError(DreamrouteError):
    """A model's weights are missing, unreadable, or fail their sha256 check."""


class BackendError(DreamrouteError):
    """A backend failed to load a model or to answer a call.

    Args:
        message: what failed, naming the tier where known.
        status: the upstream HTTP status (an OpenAI-compatible server), None for a local failure.
        retry_after_s: how long the upstream asked to be left alone (its ``Retry-After``), s;
            None when it said nothing.
    """

    def __init__(self, message: str = "", *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    @property
    def overloaded(self) -> bool:
        """True when the upstream said it is busy (HTTP 429 or 503) or asked to wait (Retry-After)."""
        return self.status in (429, 503) or self.retry_after_s is not None


class TierError(BackendError):
    """A request that names a tier cannot be answered by it (it is never answered by another).

    Args:
        tier: the tier the request named.
        message: the backend's message (or why the tier is not called now).
        status / retry_after_s: as for :class:`BackendError` (``retry_after_s``: when to try again, s).
    """

    def __init__(self, tier: str, message: str, *, status: int | None = None, retry_after_s: float | None = None):
        self.tier = tier
        self.backend_message = message
        super().__init__(self._text(tier, message), status=status, retry_after_s=retry_after_s)

    @staticmethod
    def _text(tier: str, message: str) -> str:
        return f"tier {tier!r} failed: {message}"


class TierCoolingError(TierError):
    """The named tier is cooling down after a failure and is not called until ``retry_after_s`` passes."""

    @staticmethod
    def _text(tier: str, message: str) -> str:
        return f"tier {tier!r} is cooling down after a failure ({message}); it is not called meanwhile"


class TierBusyError(BackendError):
    """A tier has no room for the call: its queue is full (``max_queue`` waiters behind
    ``max_in_flight`` calls), or the request waited for it past its deadline.

    Not a failure of the tier: it is not cooled down, no other tier answers instead (a busy
    escalation keeps the answer it had, a busy audit is dropped), and nothing of the request is
    recorded as an answer. The server answers 503 ``tier_busy`` with ``Retry-After``.

    Args:
        tier: the busy tier.
        why: what is full (the queue, the wait).
        retry_after_s: when trying again might find room, s (at least 1).

    Attributes:
        tier / retry_after_s: as given; ``status`` is 503 (an overloaded tier).
    """

    def __init__(self, tier: str, why: str, *, retry_after_s: float = 1.0):
        self.tier = tier
        super().__init__(f"tier {tier!r} is busy: {why}; retry in {retry_after_s:.0f} s",
                         status=503, retry_after_s=retry_after_s)


class NoTierAvailableError(BackendError):
    """A routed request found no tier to answer it: each candidate failed, is cooling down, or
    would take the request past the budget (outside CRISIS).

    Args:
        message: names every tier and why it was not used.
        failed: tier → the backend's message, for the calls that failed in this request.
        cooling: tier → seconds until it may be called again.
        unaffordable: tier → its expected ATP for this request, J, where that exceeds what the budget allows.
        allowance_j: the ATP the budget allowed this request when the fallback was chosen, J (None: no budget).
        retry_after_s: when trying again could help, s (the soonest cooldown end), or None.
    """

    def __init__(self, message: str, *, failed: dict[str, str] | None = None, cooling: dict[str, float] | None = None,
                 unaffordable: dict[str, float] | None = None, allowance_j: float | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message, retry_after_s=retry_after_s)
        self.failed = dict(failed or {})
        self.cooling = dict(cooling or {})
        self.unaffordable = dict(unaffordable or {})
        self.allowance_j = allowance_j


class WorkloadError(DreamrouteError):
    """A workload file is missing or holds a malformed record (the message names file and line)."""


class StoreError(DreamrouteError):
    """The store cannot be opened, migrated, or written."""


class LedgerError(StoreError):
    """The ledger's hash chain does not verify."""


class CacheError(DreamrouteError):
    """A reality-cache state cannot be read or written (damaged file, another model, full disk).

    The request it served is still answered: a cache error only costs the prefill it would have saved.
    """
