"""Any OpenAI-compatible server (llama-server, vLLM, Ollama, a hosted API) over httpx.

This module holds the backend class and its request plumbing (client, posting, retries on a
stale connection, HTTP error answers, the fallbacks of ``generate()``); reading an answer lives
in :mod:`.openai_answer`, scoring by echo in :mod:`.openai_score`, and the upstream error and
parsing helpers in :mod:`.openai_upstream`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import httpx

from ..config import TierConfig
from ..errors import BackendError, OptionError
from .base import CancelCheck, Generation, Message
from .openai_answer import OpenAIAnswers
from .openai_score import OpenAIScoring
from .openai_upstream import STALE_CONNECTION, Rejected, context_exceeded, upstream_message, parse_retry_after
from .options import TextEmitter, cancel_now, check_options


class OpenAIBackend(OpenAIAnswers, OpenAIScoring):
    """A model behind an OpenAI-compatible HTTP API.

    generate() posts ``{base_url}/chat/completions`` with ``stream: true``,
    ``stream_options: {include_usage: true}`` and ``logprobs: true, top_logprobs: max(k, 1)``
    (llama-cpp-python's server sends no logprobs without ``top_logprobs``; tier ``logprobs:
    false`` leaves them out unless the request asks); ``prefill_s`` is the time to the first
    content chunk and ``decode_s`` the rest. A server that rejects streaming (HTTP
    400/404/405/415/422/501) is asked again without it (then ``prefill_s``/``decode_s`` come
    from llama-server's ``timings`` when present, else the whole wall time is ``prefill_s``),
    and one that rejects ``logprobs`` again without logprobs; what works is remembered once
    the server answered (a refusal of the request itself, such as a prompt longer than the
    context, changes nothing). A server that ignores ``logprobs`` gives ``token_logprobs=None``.
    ``timeout_s`` bounds the whole answer (a stream that keeps sending past it is closed, which
    stops the server's generation). A stream that breaks off or ends without a
    ``finish_reason`` (llama-cpp-python's server cuts a stream short when another request
    arrives) is a BackendError, never a shorter answer; one dropped before its first token is
    asked again once without streaming, so the server's own error (llama-cpp-python's server
    raises a too-long prompt inside the stream) or its answer comes back. Errors carry the
    upstream's message (``error.message``, ``error``, ``detail``). A request that fails on a
    kept-alive connection the server had dropped, before any answer, is sent again once.

    Token counts come from the response's ``usage``. Where a server sends none,
    they are estimated as LiteLLM does for such servers, and marked
    ``extra["usage_estimated"] = True``: completion tokens = the number of
    logprobs (else content chunks, else characters / 4); prompt tokens =
    characters / 4 plus 4 per message, plus what the server's chat template adds, measured once
    per backend from an unstreamed ``max_tokens: 1`` request after the first stream without
    usage (``extra["prompt_offset"]``). ``cached_tokens`` comes from
    ``usage.prompt_tokens_details.cached_tokens`` (vLLM, OpenAI) or llama-server's
    ``timings.cache_n``.

    score() needs prompt log-probabilities: it posts ``{base_url}/completions``
    with ``echo: true, logprobs: 1, max_tokens: 1`` (vLLM, the legacy OpenAI API,
    llama-cpp-python's server; ``max_tokens: 0`` means no limit to the latter) and drops the
    generated token. The prompt is the chat-templated token ids from vLLM's ``/tokenize`` when
    the server has it, else the message contents joined by blank lines (no chat template:
    fewer tokens than ``prompt_tokens``). Once per server the echoed logprobs are checked to
    be in place (each position's most likely token is the token there, not the next one):
    llama-cpp-python's server shifts them by one for a model that adds no BOS token (the
    sensory SmolLM2 GGUF), which would be a wrong surprise. Servers without prompt logprobs (llama-server,
    Ollama) and shifted ones raise BackendError, remembered (not asked again): the engine
    takes that as surprise missing, not zero.

    save_state()/load_state() always raise BackendError: a remote server keeps
    its own prompt cache (llama-server's slots, vLLM's prefix cache), which a
    client can neither read nor restore; resend the conversation instead.

    Args:
        tier: needs ``base_url`` (e.g. ``http://127.0.0.1:8080/v1``); ``api_key``,
            ``remote_model`` (the server's model name; default ``tier.model``),
            ``timeout_s``.
        client: an httpx client to use (tests pass one with a MockTransport);
            by default one is created and closed by :meth:`close`.

    Attributes:
        identity: ``"{base_url}#{model}"``.
    """

    def __init__(self, tier: TierConfig, *, client: httpx.Client | None = None):
        if not tier.base_url:
            raise BackendError(f"tier {tier.name!r}: backend 'openai' needs base_url")
        self.tier = tier
        self.base_url = tier.base_url.rstrip("/")
        self.model = tier.remote_model or tier.model
        self.identity = f"{self.base_url}#{self.model}"
        self.load_s = 0.0
        self._own_client = client is None
        self._client = client
        self._stream_ok = True
        self._logprobs_ok = True
        self._tokenize_ok = True        # vLLM's /tokenize answered (or not tried yet)
        self._echo_shifted: bool | None = None   # echoed prompt logprobs one position early (None: not known)
        self._score_problem: str | None = None   # why score() cannot work on this server, once found
        self._prompt_offset: int | None = None   # server's prompt tokens minus the estimate (streams without usage)

    # ------------------------------------------------------------------ http

    @property
    def client(self) -> httpx.Client:
        """The httpx client (created on first use when none was passed in)."""
        if self._client is None:
            # a pool as wide as the tier's calls at once, every connection kept alive between calls
            # (httpx's default keeps 20 and opens at most 100: past those, each call paid a new
            # TCP connection, or waited for one, at max_in_flight above them)
            n = self.tier.in_flight
            limits = httpx.Limits(max_connections=max(100, n), max_keepalive_connections=max(20, n))
            self._client = httpx.Client(timeout=self.tier.timeout_s, limits=limits)
        return self._client

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tier.api_key}"} if self.tier.api_key else {}

    def _fail(self, url: str, e: Exception) -> BackendError:
        if isinstance(e, httpx.TimeoutException):
            return BackendError(f"tier {self.tier.name!r}: {url} did not answer within "
                                f"{self.tier.timeout_s:g} s (raise timeout_s in the tier config)")
        return BackendError(f"tier {self.tier.name!r}: cannot reach {url}: {e}. Is the server running?")

    def _timed_out(self, url: str) -> BackendError:
        return BackendError(f"tier {self.tier.name!r}: {url} did not finish the answer within "
                            f"{self.tier.timeout_s:g} s (raise timeout_s in the tier config)")

    def _left(self, deadline: float | None) -> float:
        """Seconds left before ``deadline`` (perf_counter; None: the tier's whole ``timeout_s``)."""
        return self.tier.timeout_s if deadline is None else max(0.001, deadline - time.perf_counter())

    def _post(self, url: str, body: dict, deadline: float | None = None) -> httpx.Response:
        for attempt in (0, 1):
            try:
                return self.client.post(url, json=body, headers=self._headers(), timeout=self._left(deadline))
            except STALE_CONNECTION as e:  # sent again once: a kept-alive connection the server had dropped
                if attempt:
                    raise self._fail(url, e) from e
            except httpx.HTTPError as e:
                raise self._fail(url, e) from e
        raise AssertionError("unreachable")

    def _send_stream(self, url: str, body: dict, deadline: float | None) -> httpx.Response:
        """The streamed answer's response, headers read (sent again once on a stale connection)."""
        request = self.client.build_request("POST", url, json=body, headers=self._headers(),
                                            timeout=self._left(deadline))
        try:
            return self.client.send(request, stream=True)
        except STALE_CONNECTION:
            return self.client.send(request, stream=True)

    def _http_error(self, url: str, r: httpx.Response) -> BackendError:
        """The BackendError for an HTTP error answer: ``status`` its code, ``retry_after_s`` its
        parsed Retry-After (seconds or an HTTP-date; None when absent)."""
        wait = parse_retry_after(r.headers.get("retry-after"))
        return BackendError(f"tier {self.tier.name!r}: {url} answered HTTP {r.status_code}"
                            + (f" (Retry-After: {wait:g} s)" if wait is not None else "") + f": {upstream_message(r)}",
                            status=r.status_code, retry_after_s=wait)

    def load(self) -> None:
        """Nothing to load: the server holds the model."""

    def close(self) -> None:
        """Close the HTTP client if this backend created it (a new one is made on demand)."""
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ generate

    def generate(self, messages: list[Message], *, max_tokens: int = 320,
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, response_format: dict | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer a chat on the server.

        ``stop``, ``top_logprobs`` and a JSON ``response_format`` are sent upstream as OpenAI
        names them; the text is also cut at the earliest stop string here, in case the server
        ignores ``stop``. With ``logprobs`` the server's ``logprobs.content`` (token, logprob,
        bytes, top_logprobs) becomes ``token_details``. ``cancel`` is polled before the call and
        between streamed chunks; a cancelled stream is closed, which stops llama-server's and
        vLLM's generation. ``on_text`` gets the text as the chunks arrive (a tail as long as the
        longest stop string held back, :class:`~.options.TextEmitter`; in one piece without streaming).

        Returns:
            :class:`Generation` (see the class docstring for where each field comes from).

        Raises:
            BackendError: the server cannot be reached, times out, answers an HTTP
                error (its ``status`` and parsed ``Retry-After`` as ``retry_after_s``), or
                sends a malformed response.
            OptionError: an option out of range, or ``logprobs`` asked of a server that gives
                none (``param`` ``logprobs``).
            GenerationCancelled: ``cancel`` returned True.
        """
        opts = check_options(stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
                             response_format=response_format)
        cancel_now(cancel)
        url = f"{self.base_url}/chat/completions"
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "seed": seed}
        if opts.stop:
            body["stop"] = list(opts.stop)
        if opts.json_mode:
            body["response_format"] = opts.response_format
        emit = TextEmitter(on_text, opts.stop)
        want_lps = opts.logprobs or self.tier.logprobs
        deadline = time.perf_counter() + self.tier.timeout_s   # for the whole answer, retries included
        stream_ok, logprobs_ok = self._stream_ok, self._logprobs_ok
        refused: httpx.Response | None = None
        while True:
            req = dict(body)
            if logprobs_ok and want_lps:
                # top_logprobs >= 1: llama-cpp-python's server sends no logprobs without it, and
                # llama-server takes it as n_probs (0: none); only the alternatives asked are kept
                req.update(logprobs=True, top_logprobs=max(opts.top_logprobs, 1))
            elif opts.logprobs:
                raise OptionError(f"tier {self.tier.name!r}: the server at {self.base_url} refuses logprobs; "
                                  "ask without logprobs or use another tier", "logprobs")
            try:
                if stream_ok:
                    req.update(stream=True, stream_options={"include_usage": True})
                    gen = self._stream(url, req, messages, opts, cancel, emit, deadline)
                else:
                    gen = self._plain(url, req, messages, opts, deadline)
            except Rejected as rej:
                # asked again without streaming, then without logprobs; what the server takes is
                # remembered once it answered. A prompt longer than the model's context is the
                # request's fault, not a missing option: refused at once, nothing remembered.
                if context_exceeded(rej.response):
                    raise self._http_error(url, rej.response) from None
                refused = rej.response if refused is None else refused
                if stream_ok:
                    stream_ok = False
                elif logprobs_ok and want_lps:
                    logprobs_ok = False
                else:
                    raise self._http_error(url, refused) from None
                continue
            self._stream_ok, self._logprobs_ok = stream_ok, logprobs_ok
            if gen.extra.get("usage_estimated") and gen.extra.get("streamed"):
                gen = self._calibrated(url, messages, gen, deadline)
            emit.finish(gen.text)
            return gen

    # ------------------------------------------------------------------ state

    def prompt_tokens(self, messages: list[Message]) -> list:
        """Always raises BackendError: no token-level access (no KV state to reuse)."""
        raise BackendError(f"tier {self.tier.name!r}: a remote server has no token-level KV state")

    def held_tokens(self) -> list:
        """Always []: no KV state is held here."""
        return []

    def state_tokens(self, state: bytes) -> list:
        """Always raises BackendError: no KV state."""
        raise BackendError(f"tier {self.tier.name!r}: a remote server has no token-level KV state")

    def settle(self) -> int:
        """Nothing to re-evaluate here (no numerics differ between decode paths): 0."""
        return 0

    def save_state(self) -> bytes:
        """Always raises BackendError: a remote server keeps its own cache."""
        raise BackendError(f"tier {self.tier.name!r}: a remote server ({self.base_url}) keeps its own "
                           "prompt cache; its KV state cannot be saved by the client")

    def load_state(self, state: bytes) -> None:
        """Always raises BackendError: a remote server keeps its own cache."""
        raise BackendError(f"tier {self.tier.name!r}: a remote server ({self.base_url}) keeps its own "
                           "prompt cache; a KV state cannot be restored into it")
