"""The server's side of generation options and of clients that go away.

* :func:`logprobs_body` / :func:`stream_pieces`: a generation's token details in OpenAI's
  ``choices[i].logprobs`` layout, whole (a ``chat.completion``) or split into stream chunks whose
  ``delta.content`` pieces join to the text and each carry the tokens they hold.
* :class:`Disconnect`: a cancel flag set when the HTTP client disconnects (the ASGI ``receive``
  awaited while the engine works), which the backends poll between tokens
  (:class:`~dreamroute.errors.GenerationCancelled`) and the waiters for a worker or a tier's turn
  poll too, so a request whose client left stops within a few tokens and a queued one never starts.
"""

from __future__ import annotations

import re
import threading

import anyio

from ..backends.base import TokenLogprob

POLL_S = 0.02
"""How often a waiting request checks whether its client is still there, s."""


def logprobs_body(details: list[TokenLogprob] | None) -> dict | None:
    """``{"content": [{token, logprob, bytes, top_logprobs}, ...], "refusal": None}``, or None
    without details (logprobs not asked)."""
    if details is None:
        return None
    return {"content": [d.to_openai() for d in details], "refusal": None}


def stream_pieces(text: str, details: list[TokenLogprob] | None) -> list[tuple[str, dict | None]]:
    """The stream's content chunks: ``[(delta content, logprobs body or None), ...]``.

    Without details: words with the whitespace after them, no logprobs. With details whose
    bytes begin with the text's UTF-8: one chunk per token, tokens holding part of a
    multi-byte character merged with the next until the bytes decode, cut at the end of the
    text (a stop string's tokens past it are dropped); each chunk's logprobs hold its tokens.
    The pieces always join to ``text``; details that do not match it (a server's odd tokens)
    go whole with the first word chunk.
    """
    words = re.findall(r"\S+\s*|\s+", text)
    if details is None:
        return [(w, None) for w in words]
    raw = text.encode("utf-8")
    if not b"".join(d.bytes for d in details).startswith(raw) or not raw:
        body = logprobs_body(details)
        return [(w, body if i == 0 else None) for i, w in enumerate(words)] or [("", body)]
    out: list[tuple[str, dict | None]] = []
    buf, group, off = b"", [], 0
    for d in details:
        take = d.bytes[: max(len(raw) - off, 0)]
        off += len(take)
        buf += take
        group.append(d)
        try:
            piece = buf.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: wait for the rest
        if not piece and off < len(raw):
            continue  # a token with no text (a special token): goes with the next
        out.append((piece, logprobs_body(group)))
        buf, group = b"", []
        if off >= len(raw):
            break
    if group:
        out.append((buf.decode("utf-8", errors="ignore"), logprobs_body(group)))
    return out


class Disconnect:
    """A request's cancel flag: set once its client disconnects.

    Attributes:
        event: the flag (``is_set`` is the backends' cancel check).
    """

    def __init__(self):
        self.event = threading.Event()

    def __call__(self) -> bool:
        """True once the client is gone (the :data:`~dreamroute.backends.base.CancelCheck`)."""
        return self.event.is_set()

    async def watch(self, request) -> None:
        """Wait for the client to go (then set the flag and return); run it beside the work and cancel
        it when the work ends. Once the body is read, the ASGI ``receive`` waits until the client
        disconnects and then says ``http.disconnect`` (uvicorn, Starlette's and httpx's test
        transports do), so this is one waiting call, not a poll (a poll every :data:`POLL_S` s cost
        each request a cancel scope and a task ``repr`` per poll: several ms of CPU at 200 ms per
        answer). A server that answers ``receive`` with anything else is polled every :data:`POLL_S` s."""
        while (await request.receive())["type"] != "http.disconnect":
            await anyio.sleep(POLL_S)
        self.event.set()

    async def guard(self, request, work):
        """``await work()`` while watching for the client to disconnect; returns its result
        (a work that sees the flag raises :class:`~dreamroute.errors.GenerationCancelled`)."""
        result, error = None, None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.watch, request)
            try:
                result = await work()
            except Exception as e:  # raised outside the task group, so not wrapped in an ExceptionGroup
                error = e
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result
