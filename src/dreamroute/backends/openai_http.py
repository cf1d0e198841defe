"""Any OpenAI-compatible server (llama-server, vLLM, Ollama, a hosted API) over httpx."""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any, Sequence

import httpx

from ..config import TierConfig
from ..errors import BackendError, GenerationCancelled, OptionError
from .base import CancelCheck, GenOptions, Generation, Message, TokenLogprob
from .options import cancel_now, check_options, earliest_stop, trim_details

_REJECTED = (400, 404, 405, 415, 422, 501)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` header (RFC 9110 §10.2.3): delay-seconds
    (``"120"``; a decimal is accepted) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``,
    counted from ``now``, unix seconds, default the current time; a date in the past gives 0.0).
    None for a missing, empty or unparsable value, or a negative delay."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    return secs if math.isfinite(secs) and secs >= 0 else None


def _estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token, the usual rule of thumb for BPE vocabularies)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


class OpenAIBackend:
    """A model behind an OpenAI-compatible HTTP API.

    generate() posts ``{base_url}/chat/completions`` with ``stream: true``,
    ``stream_options: {include_usage: true}`` and ``logprobs: true``;
    ``prefill_s`` is the time to the first content chunk and ``decode_s`` the
    rest. A server that rejects streaming (HTTP 400/404/405/415/422/501) is asked
    again without it (then ``prefill_s``/``decode_s`` come from llama-server's
    ``timings`` when present, else the whole wall time is ``prefill_s``), and
    one that rejects ``logprobs`` again without logprobs; what works is
    remembered. A server that ignores ``logprobs`` gives ``token_logprobs=None``.

    Token counts come from the response's ``usage``. Where a server sends none,
    they are estimated as LiteLLM does for such servers, and marked
    ``extra["usage_estimated"] = True``: completion tokens = the number of
    logprobs (else content chunks, else characters / 4); prompt tokens =
    characters / 4 plus 4 per message. ``cached_tokens`` comes from
    ``usage.prompt_tokens_details.cached_tokens`` (vLLM, OpenAI) or llama-server's
    ``timings.cache_n``.

    score() needs prompt log-probabilities: it posts ``{base_url}/completions``
    with ``echo: true, logprobs: 1, max_tokens: 0`` (vLLM, the legacy OpenAI API).
    The prompt is the chat-templated token ids from vLLM's ``/tokenize`` when the
    server has it, else the message contents joined by blank lines. Servers
    without prompt logprobs (llama-server, Ollama) raise BackendError.

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

    # ------------------------------------------------------------------ http

    @property
    def client(self) -> httpx.Client:
        """The httpx client (created on first use when none was passed in)."""
        if self._client is None:
            self._client = httpx.Client(timeout=self.tier.timeout_s)
        return self._client

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tier.api_key}"} if self.tier.api_key else {}

    def _fail(self, url: str, e: Exception) -> BackendError:
        if isinstance(e, httpx.TimeoutException):
            return BackendError(f"tier {self.tier.name!r}: {url} did not answer within "
                                f"{self.tier.timeout_s:g} s (raise timeout_s in the tier config)")
        return BackendError(f"tier {self.tier.name!r}: cannot reach {url}: {e}. Is the server running?")

    def _post(self, url: str, body: dict) -> httpx.Response:
        try:
            return self.client.post(url, json=body, headers=self._headers(), timeout=self.tier.timeout_s)
        except httpx.HTTPError as e:
            raise self._fail(url, e) from e

    def _http_error(self, url: str, r: httpx.Response) -> BackendError:
        """The BackendError for an HTTP error answer: ``status`` its code, ``retry_after_s`` its
        parsed Retry-After (seconds or an HTTP-date; None when absent)."""
        wait = parse_retry_after(r.headers.get("retry-after"))
        return BackendError(f"tier {self.tier.name!r}: {url} answered HTTP {r.status_code}"
                            + (f" (Retry-After: {wait:g} s)" if wait is not None else "") + f": {r.text[:300]}",
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
                 cancel: CancelCheck | None = None) -> Generation:
        """Answer a chat on the server.

        ``stop``, ``top_logprobs`` and a JSON ``response_format`` are sent upstream as OpenAI
        names them; the text is also cut at the earliest stop string here, in case the server
        ignores ``stop``. With ``logprobs`` the server's ``logprobs.content`` (token, logprob,
        bytes, top_logprobs) becomes ``token_details``. ``cancel`` is polled before the call and
        between streamed chunks; a cancelled stream is closed, which stops llama-server's and
        vLLM's generation.

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
        while True:
            req = dict(body)
            if self._logprobs_ok:
                req["logprobs"] = True
                if opts.top_logprobs:
                    req["top_logprobs"] = opts.top_logprobs
            elif opts.logprobs:
                raise OptionError(f"tier {self.tier.name!r}: the server at {self.base_url} refuses logprobs; "
                                  "ask without logprobs or use another tier", "logprobs")
            try:
                if self._stream_ok:
                    req.update(stream=True, stream_options={"include_usage": True})
                    return self._stream(url, req, messages, opts, cancel)
                return self._plain(url, req, messages, opts)
            except _Rejected as rej:
                if self._stream_ok:
                    self._stream_ok = False
                elif self._logprobs_ok:
                    self._logprobs_ok = False
                else:
                    raise self._http_error(url, rej.response) from None

    @staticmethod
    def _details(lp_content: list) -> list[TokenLogprob]:
        """OpenAI's ``logprobs.content`` entries as TokenLogprob (bytes from the token's UTF-8
        where the server sends none)."""
        def one(x, top):
            raw = x.get("bytes")
            b = bytes(raw) if isinstance(raw, list) else str(x["token"]).encode("utf-8")
            alts = tuple(one(t, ()) for t in x.get("top_logprobs") or ()) if top else ()
            return TokenLogprob(str(x["token"]), b, min(0.0, float(x["logprob"])), alts)
        return [one(x, True) for x in lp_content]

    def _stream(self, url: str, req: dict, messages: list[Message], opts: GenOptions | None = None,
                cancel: CancelCheck | None = None) -> Generation:
        t0 = time.perf_counter()
        t_first = None
        parts: list[str] = []
        lps: list[float] = []
        details: list[TokenLogprob] = []
        saw_lps, n_chunks, finish, usage, timings = False, 0, None, None, None
        try:
            with self.client.stream("POST", url, json=req, headers=self._headers(),
                                    timeout=self.tier.timeout_s) as r:
                if r.status_code in _REJECTED:
                    r.read()
                    raise _Rejected(r)
                if r.status_code >= 400:
                    r.read()
                    raise self._http_error(url, r)
                for line in r.iter_lines():
                    line = line.strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    if cancel is not None and cancel():  # leaving the block closes the stream
                        raise GenerationCancelled(completion_tokens=len(lps) if saw_lps else n_chunks,
                                                  seconds=time.perf_counter() - t0)
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    timings = chunk.get("timings") or timings
                    for ch in chunk.get("choices") or []:
                        content = (ch.get("delta") or {}).get("content")
                        if content:
                            if t_first is None:
                                t_first = time.perf_counter()
                            parts.append(content)
                            n_chunks += 1
                        lp_content = (ch.get("logprobs") or {}).get("content")
                        if lp_content is not None:
                            saw_lps = True
                            lps.extend(min(0.0, float(x["logprob"])) for x in lp_content)
                            if opts is not None and opts.logprobs:
                                details.extend(self._details(lp_content))
                        finish = ch.get("finish_reason") or finish
        except httpx.HTTPError as e:
            raise self._fail(url, e) from e
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"tier {self.tier.name!r}: malformed stream from {url}: {e}") from e
        t_end = time.perf_counter()
        t_first = t_first or t_end
        return self._result(messages, "".join(parts), lps if saw_lps else None, finish, usage,
                            timings, t_first - t0, t_end - t_first, n_chunks,
                            details if saw_lps else None, opts)

    def _plain(self, url: str, req: dict, messages: list[Message], opts: GenOptions | None = None) -> Generation:
        t0 = time.perf_counter()
        r = self._post(url, req)
        wall = time.perf_counter() - t0
        if r.status_code in _REJECTED:
            raise _Rejected(r)
        if r.status_code >= 400:
            raise self._http_error(url, r)
        try:
            resp = r.json()
            ch = resp["choices"][0]
            text = (ch.get("message") or {}).get("content") or ""
            lp_content = (ch.get("logprobs") or {}).get("content")
            lps = None if lp_content is None else [min(0.0, float(x["logprob"])) for x in lp_content]
            details = self._details(lp_content) if lp_content is not None and opts and opts.logprobs else None
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BackendError(f"tier {self.tier.name!r}: malformed response from {url}: {e}") from e
        timings = resp.get("timings")
        prefill, decode = wall, 0.0
        if timings and "prompt_ms" in timings and "predicted_ms" in timings:
            prefill, decode = timings["prompt_ms"] / 1000.0, timings["predicted_ms"] / 1000.0
        return self._result(messages, text, lps, ch.get("finish_reason"), resp.get("usage"),
                            timings, prefill, decode, None, details, opts)

    def _result(self, messages, text, lps, finish, usage, timings, prefill_s, decode_s,
                n_chunks, details=None, opts: GenOptions | None = None) -> Generation:
        extra: dict[str, Any] = {"tier": self.tier.name, "streamed": n_chunks is not None}
        if opts is not None and opts.stop and (cut := earliest_stop(text, opts.stop)) is not None:
            text, finish = text[:cut], "stop"  # the server ignored stop
            if details is not None:
                details = trim_details(details, len(text.encode("utf-8")))
        if opts is not None and opts.logprobs and details is None:
            raise OptionError(f"tier {self.tier.name!r}: the server at {self.base_url} sent no logprobs; "
                              "ask without logprobs or use another tier", "logprobs")
        if usage and usage.get("prompt_tokens") is not None and usage.get("completion_tokens") is not None:
            n_prompt, n_completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        else:
            extra["usage_estimated"] = True
            n_prompt = sum(_estimate_tokens(m.get("content") or "") + 4 for m in messages)
            n_completion = len(lps) if lps is not None else (n_chunks or _estimate_tokens(text))
        cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        if cached is None and timings:
            cached = timings.get("cache_n")
        if lps is not None and len(lps) != n_completion:
            extra["logprob_tokens"] = len(lps)
        return Generation(
            text=text, prompt_tokens=n_prompt, completion_tokens=n_completion, token_logprobs=lps,
            prefill_s=max(prefill_s, 0.0), decode_s=max(decode_s, 0.0),
            finish_reason="length" if finish == "length" else "stop",
            cached_tokens=int(cached or 0), model=self.identity, extra=extra,
            token_details=details if opts is not None and opts.logprobs else None)

    # ------------------------------------------------------------------ score

    def _server_root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def _prompt_for_scoring(self, messages: list[Message]) -> str | list[int]:
        """Chat-templated token ids from vLLM's ``/tokenize``, else the plain text."""
        url = f"{self._server_root()}/tokenize"
        try:
            r = self.client.post(url, json={"model": self.model, "messages": messages,
                                            "add_generation_prompt": True},
                                 headers=self._headers(), timeout=self.tier.timeout_s)
            if r.status_code == 200:
                tokens = r.json().get("tokens")
                if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
                    return tokens
        except (httpx.HTTPError, ValueError):
            pass
        return "\n\n".join(m.get("content") or "" for m in messages)

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Natural-log probability of each prompt token after the first (see the class docstring).

        ``new_only`` is accepted for the protocol and ignored: what a remote server's cache
        holds is not visible here, so every prompt token is scored.

        Raises:
            BackendError: the server does not return prompt logprobs, cannot be reached, or
                is overloaded (HTTP 429/503: ``status`` and ``retry_after_s`` set).
        """
        url = f"{self.base_url}/completions"
        prompt = self._prompt_for_scoring(messages)
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1,
                "max_tokens": 0, "temperature": 0.0}
        r = self._post(url, body)
        if r.status_code in _REJECTED and r.status_code != 404:
            body["max_tokens"] = 1  # some servers need one generated token; it is cut off below
            r = self._post(url, body)
        if r.status_code in (429, 503):  # overloaded, not incapable: the engine cools the tier
            raise self._http_error(url, r)
        if r.status_code >= 400:
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs "
                               f"({url} answered HTTP {r.status_code}); score() needs echo+logprobs "
                               "on /completions (vLLM has it; llama-server and Ollama do not)")
        try:
            resp = r.json()
            values = resp["choices"][0]["logprobs"]["token_logprobs"]
            n_prompt = (resp.get("usage") or {}).get("prompt_tokens")
        except (ValueError, KeyError, IndexError, TypeError):
            values = None
        if not values:
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs "
                               f"({url} sent no echoed token_logprobs)")
        if n_prompt is None:
            n_prompt = len(prompt) if isinstance(prompt, list) else len(values) - body["max_tokens"]
        values = values[1:int(n_prompt)]
        if any(v is None for v in values):
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs "
                               "(echoed token_logprobs hold nulls)")
        return [min(0.0, float(v)) for v in values]

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


class _Rejected(Exception):
    """The server refused a request option (stream / logprobs); retry without it."""

    def __init__(self, response: httpx.Response):
        super().__init__(response.status_code)
        self.response = response
