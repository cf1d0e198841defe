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


class ModelFileError(DreamrouteError):
    """A model's weights are missing, unreadable, or fail their sha256 check."""


class BackendError(DreamrouteError):
    """A backend failed to load a model or to answer a call."""


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
