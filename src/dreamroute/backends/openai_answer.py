"""The answer half of :class:`~dreamroute.backends.openai_http.OpenAIBackend`: reading a
``/chat/completions`` answer, streamed (server-sent events) or not, into a
:class:`~dreamroute.backends.base.Generation` (split from ``openai_http.py`` by responsibility).

The mixin :class:`OpenAIAnswers` turns chunks into text, token logprobs and token details
(``_stream``, ``_plain``, ``_details``), then into a Generation with the server's usage, or an
estimate corrected by what the chat template adds (``_result``, ``_calibrated``). The request
plumbing (posting, retries, error answers) stays in :mod:`.openai_http`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import httpx

from ..errors import BackendError, GenerationCancelled, OptionError
from .base import CancelCheck, GenOptions, Generation, Message, TokenLogprob
from .openai_upstream import REJECTED_STATUS, Rejected, drain, estimate_tokens
from .options import TextEmitter, earliest_stop, trim_details


class OpenAIAnswers:
    """Mixin of :class:`~dreamroute.backends.openai_http.OpenAIBackend` (uses its ``tier``,
    ``model``, ``identity``, ``base_url``, ``_prompt_offset``, ``_post()``, ``_send_stream()``,
    ``_http_error()``, ``_fail()`` and ``_timed_out()``)."""

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
            if r.status_code in REJECTED_STATUS:
                r.read()
                raise Rejected(r)
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
                    drain(lines)
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
        if r.status_code in REJECTED_STATUS:
            raise Rejected(r)
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
            n_prompt = sum(estimate_tokens(m.get("content") or "") + 4 for m in messages)
            n_completion = len(lps) if lps is not None else (n_chunks or estimate_tokens(text))
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
