"""The OpenAI backend's dealings with an upstream server's HTTP answers, apart from any request
(used by :mod:`.openai_http` and its mixins :mod:`.openai_answer` and :mod:`.openai_score`).

* :func:`parse_retry_after` reads a ``Retry-After`` header (seconds or an HTTP-date).
* ``upstream_message`` and ``context_exceeded`` read an error answer: its message, and whether
  it says the prompt does not fit the model's context.
* ``REJECTED_STATUS`` (the status codes of a refused option) and ``Rejected`` (raised to ask again
  without streaming or logprobs).
* ``STALE_CONNECTION`` (the errors of a kept-alive connection the server dropped) and ``drain`` (read a
  stream to its end so that its connection is reused).
* ``estimate_tokens``: a token count where a server sends no usage.
"""

from __future__ import annotations

import email.utils
import json
import math
import time

import httpx

REJECTED_STATUS = (400, 404, 405, 415, 422, 501)


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


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token, the usual rule of thumb for BPE vocabularies)."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


# A kept-alive connection the server dropped (llama-cpp-python's server resets one after an error
# inside a stream) fails the next request sent on it before any answer: that request is sent again.
STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def drain(lines) -> None:
    """Read what follows ``data: [DONE]`` (the end of the chunked body) so that the connection goes
    back to the pool: httpx closes a connection whose response is closed before its end, and every
    call then opened a new one (the OpenAI SDK drains its streams the same way). A failure here
    is not the answer's: that connection is just not reused."""
    try:
        for _ in lines:
            pass
    except httpx.HTTPError:
        pass


def upstream_message(r: httpx.Response) -> str:
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


def context_exceeded(r: httpx.Response) -> bool:
    """Whether an error answer says the prompt does not fit the model's context (OpenAI's, vLLM's
    and llama-cpp-python's "maximum context length" / ``context_length_exceeded``, llama-server's
    "exceeds the available context size"): the request's fault, not an option the server lacks."""
    text = r.text[:2000].lower()
    return any(w in text for w in ("context length", "context_length", "context window", "context size"))


class Rejected(Exception):
    """The server refused a request option (stream / logprobs); retry without it."""

    def __init__(self, response: httpx.Response):
        super().__init__(response.status_code)
        self.response = response
