"""Errors as OpenAI shapes them: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

| cause | status | type | code |
|---|---|---|---|
| malformed JSON, a field that does not validate, ``max_tokens`` over the cap | 400 | invalid_request_error | null |
| a field the tiers cannot honour (``n`` > 1, ``tools`` ...; ``param`` names it) | 400 | invalid_request_error | null |
| the client disconnected before the answer (generation stopped; nobody reads it) | 499 | invalid_request_error | client_closed_request |
| a prompt over the token limit | 400 | invalid_request_error | context_length_exceeded |
| a wrong or missing bearer key | 401 | invalid_request_error | invalid_api_key |
| an unknown model | 404 | invalid_request_error | model_not_found |
| an unknown response id (feedback) | 404 | invalid_request_error | response_not_found |
| the same verdict on a response again (feedback) | 409 | invalid_request_error | feedback_exists |
| an unknown path / method | 404 / 405 | invalid_request_error | null |
| a body over ``max_request_bytes`` | 413 | invalid_request_error | request_too_large |
| a named tier (``model: TIER``) failed (the backend's message; never answered by another tier) | 502 | server_error | tier_failed |
| a named tier's upstream refused the request itself (HTTP 400/413/422: too long, malformed); the tier is not cooled | 400 | invalid_request_error | context_length_exceeded / upstream_rejected |
| a named tier is cooling down, or its upstream answered 429/503 (``Retry-After``) | 503 | server_error | tier_unavailable |
| a routed request: every tier failed, is cooling, or is over the budget (``Retry-After``) | 503 | server_error | backend_unavailable |
| the tier's queue is full (``max_queue``), or its turn did not come within ``request_timeout_s`` (``Retry-After``) | 503 | server_error | tier_busy |
| no worker was free within ``request_timeout_s`` | 503 | server_error | server_busy |
| anything else | 500 | server_error | null |

FastAPI's 422 for a body that does not validate is replaced by OpenAI's 400.
Every error is counted in ``dreamroute_errors_total{type=code or type}``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (BackendError, DreamrouteError, FeedbackConflictError, GenerationCancelled, NoTierAvailableError,
                      OptionError, RequestError, StoreError, TierBusyError, TierCoolingError, TierError)

log = logging.getLogger("dreamroute.server")


class APIError(Exception):
    """An error the API answers with: HTTP ``status`` and OpenAI's error fields.

    Args:
        status: HTTP status.
        message: what was wrong and how to fix it.
        type: ``invalid_request_error`` (4xx) or ``server_error`` (5xx).
        param: the request field at fault, if any.
        code: a machine-readable code (``model_not_found`` ...), if any.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_validation(exc: RequestValidationError) -> APIError:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                             "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    parts, param = [], None
    for e in errs:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (where or None)
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        if where:
            parts.append(f"{where}: {msg}")
        elif e.get("type") == "missing":
            parts.append("the request needs a JSON object body")
        elif e.get("type") in ("model_type", "dict_type", "model_attributes_type"):
            parts.append(f"the body must be a JSON object: {msg}")
        else:
            parts.append(msg)
    return APIError(400, "Invalid request: " + "; ".join(parts), param=param)


def from_exception(exc: Exception) -> APIError:
    """The APIError for any exception a handler let through."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        msg = {404: "Unknown path; see GET /v1/models, POST /v1/chat/completions, POST /v1/feedback, "
                    "GET /v1/trust, GET|POST /v1/metabolic, GET /metrics, GET /health, GET /dashboard",
               405: "Method not allowed on this path"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, msg, headers=dict(exc.headers or {}))
    if isinstance(exc, FeedbackConflictError):
        return APIError(409, f"{exc} (it would count one answer many times in trust).", param="id",
                        code="feedback_exists")
    if isinstance(exc, OptionError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, RequestError):
        return APIError(400, str(exc))
    if isinstance(exc, GenerationCancelled):
        return APIError(499, "The client closed the request before it was answered; its generation was "
                             "stopped and nothing of it was recorded as an answer.", code="client_closed_request")
    if isinstance(exc, TierBusyError):
        return APIError(503, f"{exc}. Nothing of this request was recorded; retry after Retry-After seconds.",
                        code="tier_busy", headers={"Retry-After": _seconds(exc.retry_after_s)})
    if isinstance(exc, TierError):
        hint = " It is not answered by another tier; send model `dreamroute` to route around it."
        wait = {"Retry-After": _seconds(exc.retry_after_s)}
        if isinstance(exc, TierCoolingError) or exc.status in (429, 503):
            return APIError(503, f"{exc}.{hint}", param="model", code="tier_unavailable", headers=wait)
        if exc.status in (400, 413, 422):   # the upstream refused the request itself: the client's to fix
            code = "context_length_exceeded" if "context" in str(exc).lower() else "upstream_rejected"
            return APIError(400, f"{exc}. The tier refused this request; change the request (the tier "
                                 "was not taken out of service).", param="messages", code=code)
        return APIError(502, f"{exc}.{hint}", param="model", code="tier_failed")
    if isinstance(exc, NoTierAvailableError):
        return APIError(503, f"{exc}.", code="backend_unavailable", headers={"Retry-After": _seconds(exc.retry_after_s)})
    if isinstance(exc, BackendError):
        return APIError(503, f"No tier could answer: {exc}", code="backend_unavailable",
                        headers={"Retry-After": "5"})
    if isinstance(exc, StoreError):
        log.error("store error: %s", exc)
        return APIError(500, f"The store failed; nothing of this request was kept: {exc}")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}")


def _seconds(wait: float | None) -> str:
    """A Retry-After value: whole seconds, at least 1 (1 when the wait is unknown)."""
    return str(max(1, math.ceil(wait))) if wait is not None else "1"


def install(app: FastAPI, count: Callable[[APIError, Request], None]) -> None:
    """Answer every error in OpenAI's shape; ``count(error, request)`` records it (metrics)."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        count(err, request)
        return err.response()

    for cls in (APIError, RequestValidationError, StarletteHTTPException, DreamrouteError, Exception):
        app.add_exception_handler(cls, handle)
