"""Any OpenAI-compatible server (llama-server, vLLM, Ollama, a hosted API) over httpx."""

from __future__ import annotations

import dataclasses
import email.utils
import json
import math
import time
from typing import Any, Callable, Sequence

import httpx

from ..config import TierConfig
from ..errors import BackendError, GenerationCancelled, OptionError
from .base import CancelCheck, GenOptions, Generation, Message, TokenLogprob
from .options import TextEmitter, cancel_now, check_options, earliest_stop, trim_details

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


# A kept-alive connection the server dropped (llama-cpp-python's server resets one after an error
# inside a stream) fails the next request sent on it before any answer: that request is sent again.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _drain(lines) -> None:
    """Read what follows ``data: [DONE]`` (the end of the chunked body) so that the connection goes
    back to the pool: httpx closes a connection whose response is closed before its end, and every
    call then opened a new one (the OpenAI SDK drains its streams the same way). A failure here
    is not the answer's: that connection is just not reused."""
    try:
        for _ in lines:
            pass
    except httpx.HTTPError:
        pass


def _upstream_message(r: httpx.Response) -> str:
    """The message of an upstream's error answer: ``error.message`` (OpenAI, vLLM, llama-server,
    llama-cpp-python), ``error`` as a string (Ollama), ``message`` or ``detail`` (FastAPI), else
    the body's first 300 characters."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        for v in (err, body.get("message"), body.get("detail")):
            if isinstance(v, str) and v:
                return v[:500]
        if body.get("detail"):
            return json.dumps(body["detail"])[:500]
    return r.text[:300]


def _context_exceeded(r: httpx.Response) -> bool:
    """Whether an error answer says the prompt does not fit the model's context (OpenAI's, vLLM's
    and llama-cpp-python's "maximum context length" / ``context_length_exceeded``, llama-server's
    "exceeds the available context size"): the request's fault, not an option the server lacks."""
    text = r.text[:2000].lower()
    return any(w in text for w in ("context length", "context_length", "context window", "context size"))


def _echo_shift(tokens, tops) -> bool | None:
    """Whether echoed prompt logprobs (the legacy ``logprobs.tokens`` / ``top_logprobs`` layout) are
    one position early: entry i holding the distribution that predicts token i + 1, as
    llama-cpp-python's server sends for a model that adds no BOS token (its ``echo`` reads logits
    row i for token i). Counts the entries whose most likely token is the token there (a) and
    the one after it (b): a model predicts the token it sees far more often than a repeat of the
    previous one. None when too few entries say either way."""
    if not isinstance(tokens, list) or not isinstance(tops, list) or len(tokens) != len(tops):
        return None
    a = b = 0
    for i, top in enumerate(tops):
        if not isinstance(top, dict) or not top:
            continue
        best = max(top, key=lambda t: top[t] if isinstance(top[t], (int, float)) else -math.inf)
        a += best == tokens[i]
        b += i + 1 < len(tokens) and best == tokens[i + 1]
    if max(a, b) < 3 or max(a, b) < 2 * min(a, b):
        return None
    return b > a


# Scored once when a real prompt does not show whether a server's echoed logprobs are in place: a
# repeated sequence, which any language model predicts in its second half.
_ECHO_PROBE = "one two three four five six seven eight nine ten, one two three four five six seven eight nine ten"


class OpenAIBackend:
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
            except _STALE as e:  # sent again once: a kept-alive connection the server had dropped
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
        except _STALE:
            return self.client.send(request, stream=True)

    def _http_error(self, url: str, r: httpx.Response) -> BackendError:
        """The BackendError for an HTTP error answer: ``status`` its code, ``retry_after_s`` its
        parsed Retry-After (seconds or an HTTP-date; None when absent)."""
        wait = parse_retry_after(r.headers.get("retry-after"))
        return BackendError(f"tier {self.tier.name!r}: {url} answered HTTP {r.status_code}"
                            + (f" (Retry-After: {wait:g} s)" if wait is not None else "") + f": {_upstream_message(r)}",
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
            except _Rejected as rej:
                # asked again without streaming, then without logprobs; what the server takes is
                # remembered once it answered. A prompt longer than the model's context is the
                # request's fault, not a missing option: refused at once, nothing remembered.
                if _context_exceeded(rej.response):
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

    def _calibrated(self, url: str, messages: list[Message], gen: Generation, deadline: float) -> Generation:
        """``gen`` with its estimated prompt tokens corrected by what the server's chat template adds
        (a default system prompt, role markers: three times the text's own tokens for a short chat
        on SmolLM2). A stream without usage (llama-cpp-python's server) is followed, once per
        backend, by the same messages unstreamed with ``max_tokens: 1``; the difference between the
        prompt tokens its usage gives and the estimate is added to every later estimate."""
        if self._prompt_offset is None:
            self._prompt_offset = 0
            try:
                r = self._post(url, {"model": self.model, "messages": messages, "max_tokens": 1,
                                     "temperature": 0.0}, deadline)
                n = (r.json().get("usage") or {}).get("prompt_tokens") if r.status_code == 200 else None
                if isinstance(n, int) and n > 0:
                    self._prompt_offset = n - gen.prompt_tokens
            except (BackendError, ValueError, AttributeError):
                pass
        if not self._prompt_offset:
            return gen
        return dataclasses.replace(gen, prompt_tokens=max(1, gen.prompt_tokens + self._prompt_offset),
                                   extra={**gen.extra, "prompt_offset": self._prompt_offset})

    @staticmethod
    def _details(lp_content: list, k: int = 0) -> list[TokenLogprob]:
        """OpenAI's ``logprobs.content`` entries as TokenLogprob (bytes from the token's UTF-8
        where the server sends none, as llama-cpp-python's server does), each with its ``k`` most
        likely alternatives, most likely first (a server may send more: at least one is always
        asked, and llama-cpp-python's adds the chosen token when it is not among them)."""
        def one(x, top):
            raw = x.get("bytes")
            b = bytes(raw) if isinstance(raw, list) else str(x["token"]).encode("utf-8")
            alts = ()
            if top and k:
                alts = tuple(sorted((one(t, False) for t in x.get("top_logprobs") or ()),
                                    key=lambda t: -t.logprob)[:k])
            return TokenLogprob(str(x["token"]), b, min(0.0, float(x["logprob"])), alts)
        return [one(x, True) for x in lp_content]

    def _stream(self, url: str, req: dict, messages: list[Message], opts: GenOptions | None = None,
                cancel: CancelCheck | None = None, emit: TextEmitter | None = None,
                deadline: float | None = None) -> Generation:
        t0 = time.perf_counter()
        t_first = None
        parts: list[str] = []
        lps: list[float] = []
        details: list[TokenLogprob] = []
        saw_lps, n_chunks, finish, usage, timings = False, 0, None, None, None
        k = opts.top_logprobs if opts is not None else 0
        r: httpx.Response | None = None
        broke: httpx.HTTPError | None = None
        try:
            r = self._send_stream(url, req, deadline)
            if r.status_code in _REJECTED:
                r.read()
                raise _Rejected(r)
            if r.status_code >= 400:
                r.read()
                raise self._http_error(url, r)
            lines = r.iter_lines()
            for line in lines:
                if deadline is not None and time.perf_counter() > deadline:  # closing the stream stops the server
                    raise self._timed_out(url)
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    _drain(lines)
                    break
                if cancel is not None and cancel():  # leaving closes the stream
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
                        if emit is not None and emit.on_text is not None:
                            emit.update("".join(parts))
                    lp_content = (ch.get("logprobs") or {}).get("content")
                    if lp_content is not None:
                        saw_lps = True
                        lps.extend(min(0.0, float(x["logprob"])) for x in lp_content)
                        if opts is not None and opts.logprobs:
                            details.extend(self._details(lp_content, k))
                    finish = ch.get("finish_reason") or finish
        except httpx.HTTPError as e:
            if r is None or isinstance(e, httpx.TimeoutException):
                raise self._fail(url, e) from e
            broke = e  # the stream broke off: below
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"tier {self.tier.name!r}: malformed stream from {url}: {e}") from e
        finally:
            if r is not None:
                r.close()
        if finish is None:  # no answer, or part of one: never returned as if it were whole
            if not n_chunks and not saw_lps:
                # accepted, then dropped before any token (llama-cpp-python's server raises a prompt
                # longer than its context inside the stream): asked once without streaming, the
                # server says why, or answers
                plain = {key: v for key, v in req.items() if key not in ("stream", "stream_options")}
                return self._plain(url, plain, messages, opts, deadline)
            if broke is not None:
                raise BackendError(f"tier {self.tier.name!r}: the stream from {url} broke off after {n_chunks} "
                                   f"chunks ({broke}). Is the server running?") from broke
            raise BackendError(f"tier {self.tier.name!r}: the stream from {url} ended after {n_chunks} chunks "
                               "without a finish_reason: the server cut the answer short (llama-cpp-python's "
                               "server does when another request arrives, unless started with "
                               "--interrupt_requests false; or set the tier's max_in_flight to 1)")
        t_end = time.perf_counter()
        t_first = t_first or t_end
        return self._result(messages, "".join(parts), lps if saw_lps else None, finish, usage,
                            timings, t_first - t0, t_end - t_first, n_chunks,
                            details if saw_lps else None, opts)

    def _plain(self, url: str, req: dict, messages: list[Message], opts: GenOptions | None = None,
               deadline: float | None = None) -> Generation:
        t0 = time.perf_counter()
        r = self._post(url, req, deadline)
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
            details = (self._details(lp_content, opts.top_logprobs)
                       if lp_content is not None and opts and opts.logprobs else None)
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
        """Chat-templated token ids from vLLM's ``/tokenize``, else the plain text (a server
        without ``/tokenize`` is not asked again)."""
        if self._tokenize_ok:
            url = f"{self._server_root()}/tokenize"
            try:
                r = self.client.post(url, json={"model": self.model, "messages": messages,
                                                "add_generation_prompt": True},
                                     headers=self._headers(), timeout=self.tier.timeout_s)
                if r.status_code == 200:
                    tokens = r.json().get("tokens")
                    if isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens):
                        return tokens
                if r.status_code in _REJECTED:
                    self._tokenize_ok = False
            except (httpx.HTTPError, ValueError):
                pass
        return "\n\n".join(m.get("content") or "" for m in messages)

    def _unsupported(self, why: str) -> BackendError:
        """The BackendError of a server that cannot score prompts, remembered: score() raises it
        again without asking the server."""
        self._score_problem = (f"tier {self.tier.name!r}: server does not return prompt logprobs ({why}); "
                               "score() needs echo+logprobs on /completions (vLLM has it; llama-server and "
                               "Ollama do not), so this tier gives no surprise (missing, not zero)")
        return BackendError(self._score_problem)

    def _echo(self, url: str, prompt: str | list[int]) -> tuple[dict, dict]:
        """The ``logprobs`` and ``usage`` of ``prompt`` echoed with one generated token
        (``max_tokens: 1``: llama-cpp-python's server reads 0 as no limit and generates to the
        end of its context)."""
        body = {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 1,
                "max_tokens": 1, "temperature": 0.0}
        r = self._post(url, body)
        if r.status_code in (429, 503):  # overloaded, not incapable: the engine cools the tier
            raise self._http_error(url, r)
        if r.status_code >= 400 and _context_exceeded(r):  # this prompt is too long; others score
            raise self._http_error(url, r)
        if r.status_code >= 400:
            why = f"{url} answered HTTP {r.status_code}: {_upstream_message(r)}"
            if r.status_code in _REJECTED:
                raise self._unsupported(why)
            raise BackendError(f"tier {self.tier.name!r}: server does not return prompt logprobs ({why})")
        try:
            resp = r.json()
            lp = resp["choices"][0]["logprobs"]
            values = lp["token_logprobs"]
            usage = resp.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            values = None
        if not values or not isinstance(values, list):
            raise self._unsupported(f"{url} sent no echoed token_logprobs")
        return lp, usage

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Natural-log probability of each prompt token after the first (see the class docstring).

        ``new_only`` is accepted for the protocol and ignored: what a remote server's cache
        holds is not visible here, so every prompt token is scored.

        Raises:
            BackendError: the server does not return prompt logprobs (remembered: it is not asked
                again), returns them out of place, cannot be reached, the prompt exceeds its
                context (``status`` 400), or it is overloaded (HTTP 429/503: ``status`` and
                ``retry_after_s`` set).
        """
        if self._score_problem is not None:
            raise BackendError(self._score_problem)
        url = f"{self.base_url}/completions"
        lp, usage = self._echo(url, self._prompt_for_scoring(messages))
        if self._echo_shifted is None:  # once per server: are the echoed logprobs where they belong?
            shifted = _echo_shift(lp.get("tokens"), lp.get("top_logprobs"))
            if shifted is None and isinstance(lp.get("top_logprobs"), list):  # this prompt does not say
                probe, _ = self._echo(url, _ECHO_PROBE)
                shifted = _echo_shift(probe.get("tokens"), probe.get("top_logprobs"))
            self._echo_shifted = bool(shifted)
        if self._echo_shifted:
            raise self._unsupported(f"{url} echoes each prompt token's logprob from the logits that predict "
                                    "the next token, as llama-cpp-python's server does for a model whose GGUF "
                                    "adds no BOS token (tokenizer.ggml.add_bos_token false)")
        values = list(lp["token_logprobs"])
        n_gen = usage.get("completion_tokens")
        n_gen = 1 if n_gen is None else int(n_gen)
        if 0 < n_gen < len(values):  # the generated token is not the prompt's
            values = values[:-n_gen]
        while values and values[0] is None:  # the first token (and a BOS) have none
            values.pop(0)
        if not values or any(v is None for v in values):
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
