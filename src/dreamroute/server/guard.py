"""The gate every request passes before any route: bearer-key auth and the body size limit.

A pure ASGI middleware, so an oversize body is refused from its
``Content-Length`` (or, without one, as soon as the streamed body passes the
limit) before any of it is parsed as JSON, and a request without the key gets
nothing but a 401.
"""

from __future__ import annotations

import hmac
from typing import Callable

from .errors import APIError

OPEN_PATHS = frozenset({"/health", "/dashboard"})  # the page holds no data; /dashboard/data needs the key


class Guard:
    """ASGI middleware: auth (when ``api_key`` is set) on every path but ``OPEN_PATHS``, then the
    body limit on requests that carry one.

    Args:
        app: the ASGI app behind it.
        api_key: the bearer key (``Authorization: Bearer KEY``); None: no auth.
        max_bytes: largest body accepted, bytes.
        on_reject: called with each APIError answered here (metrics).
    """

    def __init__(self, app, *, api_key: str | None, max_bytes: int,
                 on_reject: Callable[[APIError], None] | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def _reject(self, err: APIError, scope, receive, send) -> None:
        if self.on_reject is not None:
            self.on_reject(err)
        await err.response()(scope, receive, send)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] not in OPEN_PATHS and not self._authorised(headers):
            given = b"authorization" in headers
            msg = ("Incorrect API key provided. " if given else "You didn't provide an API key. ") + \
                "Send it as 'Authorization: Bearer KEY' (the key the server was started with: --api-key, " \
                "server.api_key or DREAMROUTE_SERVER__API_KEY)."
            return await self._reject(APIError(401, msg, code="invalid_api_key",
                                               headers={"WWW-Authenticate": "Bearer"}), scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"Request body is larger than the server's limit of {self.max_bytes} bytes "
                                  "(server.max_request_bytes).", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    return await self._reject(too_large, scope, receive, send)
            except ValueError:
                return await self._reject(APIError(400, "Invalid Content-Length header"), scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._reject(too_large, scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
