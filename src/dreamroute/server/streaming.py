"""Live streaming: a request that names a tier gets its tokens as they are generated.

A request pinned to a tier (``model: TIER``) cannot be escalated, so its text is final as soon as
it is generated: the backend's ``on_text`` (called in the engine's worker thread) hands each piece
to the event loop through a queue, and :class:`LiveStream` sends it as a chunk. A routed request
(``model: dreamroute``) is not streamed this way: the router may read a cheap tier's answer and
then escalate, so its answer is complete before its first chunk (``handlers._respond``).

The HTTP status is chosen once the first piece exists: a request refused before any text (a busy
or cooling tier, a prompt over the limit, a client that left) gets its ordinary error response.
After the first chunk, a failure ends the stream with an ``{"error": {...}}`` event (OpenAI's shape)
and no ``[DONE]``; a client that disconnects stops the generation within a token (the request's
:class:`~.generation.Disconnect` is set), and nothing of it is recorded as an answer.

Headers known before the answer: ``x-dreamroute-tier`` (the pinned tier),
``x-dreamroute-request-id``, ``x-dreamroute-fast-path: 0``; the context and ATP come in the
final chunk's ``dreamroute`` object.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Awaitable, Callable

import anyio
from starlette.background import BackgroundTask
from starlette.responses import Response

from .errors import from_exception
from .generation import Disconnect

Work = Callable[[Callable[[str], None], Disconnect], Awaitable[Any]]


def sse(obj: dict) -> bytes:
    """One server-sent event ``data: {json}``."""
    return ("data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n").encode()


class LiveStream(Response):
    """An ASGI response that runs a pinned request and streams its text as it is generated.

    Args:
        work: ``await work(on_text, cancel)`` answers the request (in a worker thread, calling
            ``on_text(piece)`` there) and returns the Answer.
        chunk: ``chunk(delta)`` the ``chat.completion.chunk`` dict carrying ``delta`` (its
            ``content`` piece, or the opening role).
        tail: ``tail(answer)`` the closing events (the ``finish_reason`` chunk with the
            ``dreamroute`` object, the usage chunk, ``[DONE]``), as bytes.
        headers: response headers.
        on_error: ``on_error(api_error)`` counts an error sent inside the stream (metrics).
        background: run after the stream ends (the idle warm-handoff).
    """

    def __init__(self, work: Work, chunk: Callable[[dict], dict], tail: Callable[[Any], bytes],
                 headers: dict[str, str], on_error: Callable[[Any], None], background: BackgroundTask | None = None):
        self.status_code = 200
        self.work, self.chunk, self.tail = work, chunk, tail
        self.stream_headers = {**headers, "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        self.on_error, self.background = on_error, background
        self.answer = None

    async def __call__(self, scope, receive, send) -> None:
        gone = Disconnect()
        put, get = anyio.create_memory_object_stream(math.inf)
        loop = asyncio.get_running_loop()

        def on_text(piece: str) -> None:  # in the worker thread: never waits for the event loop
            loop.call_soon_threadsafe(put.send_nowait, ("text", piece))

        async def drive() -> None:
            try:
                put.send_nowait(("done", await self.work(on_text, gone)))
            except Exception as e:  # noqa: BLE001 - handed to the stream (or the error handlers)
                put.send_nowait(("error", e))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.event.set()

        error: Exception | None = None
        watching = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            tg.start_soon(_scoped, watching, watch)
            try:
                kind, item = await get.receive()
                if kind == "error":
                    error = item          # nothing sent yet: the ordinary error response, below
                else:
                    await self._stream(send, get, kind, item, gone)
            finally:
                watching.cancel()
        if error is not None:
            raise error                   # outside the task group, so not wrapped in an ExceptionGroup
        if self.background is not None:
            await self.background()

    async def _stream(self, send, get, kind: str, item, gone: Disconnect) -> None:
        """Send the head, the pieces as they come, and the tail (or an error event)."""
        alive = await self._send(send, {"type": "http.response.start", "status": 200,
                                        "headers": [(k.encode(), v.encode()) for k, v in self.stream_headers.items()]})
        alive = alive and await self._body(send, sse(self.chunk({"role": "assistant", "content": ""})))
        while True:
            if kind == "text":
                if alive:
                    alive = await self._body(send, sse(self.chunk({"content": item})))
                if not alive:
                    gone.event.set()      # the client left: stop the generation
            elif kind == "done":
                self.answer = item
                if alive:
                    await self._body(send, self.tail(item), more=False)
                return
            else:
                err = from_exception(item)
                self.on_error(err)
                if alive:
                    await self._body(send, sse(err.body()), more=False)
                return
            kind, item = await get.receive()

    @staticmethod
    async def _send(send, message: dict) -> bool:
        try:
            await send(message)
            return True
        except OSError:
            return False

    async def _body(self, send, data: bytes, more: bool = True) -> bool:
        return await self._send(send, {"type": "http.response.body", "body": data, "more_body": more})


async def _scoped(scope: anyio.CancelScope, fn) -> None:
    with scope:
        await fn()

