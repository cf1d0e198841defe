"""Backends: llama.cpp in process, OpenAI-compatible HTTP servers, and a scripted test backend.

:func:`make_backend` builds the right one for a tier. Backend modules are
imported lazily, so llama-cpp-python is only needed for ``llama`` tiers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import Backend, Generation, Message

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Settings, TierConfig

__all__ = ["Backend", "Generation", "Message", "make_backend"]


def make_backend(tier: "TierConfig", settings: "Settings", *, seed: int = 0) -> Backend:
    """Build the backend of one tier.

    * ``llama``: resolves the weights with
      :func:`dreamroute.backends.registry.resolve_model` into ``settings.models_dir``
      (assembling and sha256-checking them on first use), then a
      :class:`~dreamroute.backends.llama.LlamaBackend` (the model loads lazily).
    * ``openai``: an :class:`~dreamroute.backends.openai_http.OpenAIBackend`.
    * ``scripted``: not buildable from config (tests construct
      :class:`~dreamroute.backends.scripted.ScriptedBackend` in code).

    Raises:
        ModelFileError: a ``llama`` tier's weights cannot be resolved.
        BackendError: its ``lora`` adapter file does not exist.
        ConfigError: a ``scripted`` tier, or an unknown backend.
    """
    if tier.backend == "llama":
        from .registry import resolve_model

        if tier.n_threads is None and settings.threads:
            tier = tier.model_copy(update={"n_threads": settings.threads})
        from .llama import LlamaBackend

        path = resolve_model(tier.source, settings.models_dir)
        backend = LlamaBackend(tier, path, seed=seed)
        if tier.lora is not None:
            backend.use_adapter(tier.lora)
        return backend
    if tier.backend == "openai":
        from .openai_http import OpenAIBackend

        return OpenAIBackend(tier)
    if tier.backend in ("scripted", "replay"):
        raise ConfigError(
            f"tier {tier.name!r} has backend {tier.backend!r}: scripted and replay tiers are built in code (tests, simulate) "
            "(dreamroute.backends.scripted.ScriptedBackend); use 'llama' or 'openai' in a config file.")
    raise ConfigError(f"tier {tier.name!r}: unknown backend {tier.backend!r}; use 'llama' or 'openai'")
