"""The settings object: YAML files, ``DREAMROUTE_*`` environment variables and CLI flags
all feed :class:`Settings` (the hierarchy's tiers, the router, cache, server, store and
metabolic settings), loaded by :func:`load_settings`.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import ConfigError, UnknownTierError
from .db_url import hide_password, is_server_url, is_url
from .metabolic import MetabolicConfig
from .policy import parse_policy
from .router import RouterConfig
from .tiers import TierConfig, default_tiers


def default_data_dir() -> Path:
    """Per-user data directory (the store, the assembled models, the KV cache)."""
    return Path(platformdirs.user_data_dir("dreamroute", appauthor=False))


class CacheConfig(BaseModel):
    """The reality cache: conversation KV states on disk (see ``dreamroute.cache``).

    Attributes:
        enabled: keep and restore conversation KV states (``--no-cache`` turns it off).
        dir: where the states live (default ``<data_dir>/kv``).
        max_bytes: byte budget on disk; least recently used states are evicted beyond it.
        handoff: after a surprising turn, prefill the next tier up with the conversation
            while idle ("warm handoff"), so an escalation pays only for new tokens.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    dir: Path | None = None
    max_bytes: int = Field(2 * 1024**3, ge=0)
    handoff: bool = True


class ServerConfig(BaseModel):
    """``dreamroute serve``: the OpenAI-compatible server (see ``dreamroute.server``).

    Attributes:
        host / port: where uvicorn listens (loopback by default; port 0 = any free port).
        api_key: bearer key every endpoint but ``/health`` requires (None: no auth).
        max_request_bytes: largest request body accepted, bytes (413 beyond it).
        max_prompt_tokens: largest prompt, in tokens of the answering tier's chat template
            (400 ``context_length_exceeded`` beyond it, or when prompt plus ``max_tokens``
            exceed the smallest tier ``n_ctx``); None: that ``n_ctx`` minus ``default_max_tokens``.
        max_completion_tokens: largest ``max_tokens`` a request may ask for.
        default_max_tokens: generation limit when a request gives none.
        budget: average ATP per routed request, J (None: no budget).
        policy: routing policy of ``model: dreamroute`` (``dreamroute``, ``cascade[:T]`` ...).
        fast_path: answer normalised exact repeats whose answer has a witnessed success
            from the response cache, before the router.
        request_timeout_s: longest a request waits, for a worker and for its tiers' queues
            (requests run concurrently, each tier with its own ``max_in_flight`` and ``max_queue``),
            before it is refused with 503 (``server_busy`` / ``tier_busy``, Retry-After); a
            generation already running is not cut.
        cooldown_s: how long a tier whose backend failed is skipped, s, unless its upstream's
            Retry-After says how long (routed requests fall back to another tier meanwhile;
            ``run`` uses it too; see ``router/faults.py``).
        access_log: uvicorn's access log, one line per HTTP request on stdout (on by default;
            off saves the server about 0.2 ms of CPU per request: ``DREAMROUTE_SERVER__ACCESS_LOG=false``).
    """

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_request_bytes: int = Field(1024 * 1024, ge=1024)
    max_prompt_tokens: int | None = Field(None, ge=16)
    max_completion_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(320, ge=1)
    budget: float | None = Field(None, ge=0)
    policy: str = "dreamroute"
    fast_path: bool = True
    request_timeout_s: float = Field(300.0, gt=0)
    cooldown_s: float = Field(60.0, ge=0)
    access_log: bool = True

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host must name an interface, e.g. 127.0.0.1 (loopback) or 0.0.0.0 (all)")
        return v.strip()

    @field_validator("api_key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("api_key must not be empty; leave it out (null) to serve without auth")
        return v

    @model_validator(mode="after")
    def _limits(self) -> "ServerConfig":
        if self.default_max_tokens > self.max_completion_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= "
                             f"max_completion_tokens ({self.max_completion_tokens})")
        return self


class StoreConfig(BaseModel):
    """The store as several routers share it (``store:``; see ``dreamroute.store``).

    Attributes:
        instance_id: this router's name in the store: its own ledger chain and the instance its
            experiences are stored under (1-64 characters, not ``legacy``). None (default): a new
            uuid each time a store is opened (a new chain per process); set it to continue one
            chain across restarts (two running routers must never share one).
        sync: keep the in-memory learned state current with what other routers store (a
            background poll, ``DreamRoute.start_sync``): None (default) = on when ``--db`` is a
            server URL (PostgreSQL), off for an SQLite file; True/False to force it.
        sync_interval_s: seconds between two polls of the store (default 1.0).
    """

    model_config = ConfigDict(extra="forbid")
    instance_id: str | None = Field(None, min_length=1, max_length=64)
    sync: bool | None = None
    sync_interval_s: float = Field(1.0, gt=0)

    @field_validator("instance_id")
    @classmethod
    def _iid(cls, v: str | None) -> str | None:
        if v is not None and (v.strip() != v or v == "legacy"):
            raise ValueError("instance_id must have no surrounding spaces and is not 'legacy' "
                             "(the chain of entries written before ledger chains)")
        return v


class Settings(BaseSettings):
    """Everything dreamroute is configured with.

    Sources, lowest precedence first: defaults, a YAML file (``--config``),
    ``DREAMROUTE_*`` environment variables (nested with ``__``, e.g.
    ``DREAMROUTE_ROUTER__K=10``), CLI flags. ``threads`` (``DREAMROUTE_THREADS``)
    sets llama.cpp threads for every tier that does not set ``n_threads``: on
    a shared machine, one thread per process avoids the slowdown llama.cpp's
    spinning threads suffer when a core is taken by another process.
    """

    model_config = SettingsConfigDict(env_prefix="DREAMROUTE_", env_nested_delimiter="__", extra="forbid")
    tiers: list[TierConfig] = Field(default_factory=default_tiers)
    router: RouterConfig = Field(default_factory=RouterConfig)
    data_dir: Path = Field(default_factory=default_data_dir)
    db: Path | str | None = None   # a file path, or an SQLAlchemy URL kept as text (store/url.py)
    store: StoreConfig = Field(default_factory=lambda: StoreConfig())
    model_cache: Path | None = None
    threads: int | None = Field(None, ge=1)
    cache: CacheConfig = Field(default_factory=lambda: CacheConfig())
    metabolic: MetabolicConfig = Field(default_factory=lambda: MetabolicConfig())
    dream: dict = Field(default_factory=dict)  # DreamConfig fields (dream_config.py validates them)
    server: ServerConfig = Field(default_factory=lambda: ServerConfig())

    @field_validator("db", mode="before")
    @classmethod
    def _db(cls, v: object) -> object:
        """A URL (``scheme://``, ``scheme+driver://``) stays text and is never a file name;
        anything else is a path (``~`` expanded)."""
        if v is None or isinstance(v, Path):
            return v
        if isinstance(v, str):
            v = v.strip()
            return v if is_url(v) else Path(v).expanduser() if v else None
        return v

    @field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, v: list[TierConfig]) -> list[TierConfig]:
        if not v:
            raise ValueError("the hierarchy needs at least one tier")
        names = [t.name for t in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tier names must be unique; repeated: {sorted(dup)}")
        return v

    @model_validator(mode="after")
    def _server_policy(self) -> "Settings":
        try:
            parse_policy(self.server.policy, self.tier_names)
        except ConfigError as e:
            raise ValueError(f"server.policy: {e}") from None
        return self

    @property
    def context_tokens(self) -> int:
        """The smallest tier context (``n_ctx``), tokens: what a prompt plus its answer must fit."""
        return min(t.n_ctx for t in self.tiers)

    @property
    def max_prompt_tokens(self) -> int:
        """The server's prompt limit, tokens: ``server.max_prompt_tokens``, else
        :attr:`context_tokens` minus ``server.default_max_tokens`` (at least 16)."""
        if self.server.max_prompt_tokens is not None:
            return self.server.max_prompt_tokens
        return max(16, self.context_tokens - self.server.default_max_tokens)

    @property
    def db_path(self) -> Path | str:
        """The store: ``--db`` (a file ``Path``, or an SQLAlchemy URL ``str``) or
        ``<data_dir>/dreamroute.db``; what ``Store`` opens."""
        return self.db or self.data_dir / "dreamroute.db"

    @property
    def db_display(self) -> str:
        """:attr:`db_path` for messages: a URL's password hidden."""
        return hide_password(self.db_path)

    @property
    def sync_enabled(self) -> bool:
        """Whether a router on :attr:`db_path` polls the store for other routers' experiences
        (``store.sync``; by default only for a server URL, which several routers share).
        ``DreamRoute.start_sync`` decides the same by the store it actually opened."""
        return self.store.sync if self.store.sync is not None else is_server_url(self.db_path)

    @property
    def models_dir(self) -> Path:
        """Where assembled GGUF files are cached."""
        return self.model_cache or self.data_dir / "models"

    @property
    def kv_dir(self) -> Path:
        """Where the reality cache keeps conversation KV states."""
        return self.cache.dir or self.data_dir / "kv"

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: str) -> TierConfig:
        """The tier called ``name``. Raises UnknownTierError."""
        for t in self.tiers:
            if t.name == name:
                return t
        raise UnknownTierError(name, self.tier_names)


def load_settings(path: Path | str | None = None, **overrides) -> Settings:
    """Build :class:`Settings` from an optional YAML file, the environment and overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate (the
            message lists each bad field).
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping (tiers:, router:, ...), not {type(loaded).__name__}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        lines = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid configuration{where}: {lines}") from e
