"""The OpenAI-compatible server: ``create_app(settings)`` builds a FastAPI app over one DreamRoute.

Endpoints: ``POST /v1/chat/completions`` (``model``: a tier name forces that tier, ``dreamroute``
routes), ``GET /v1/models``, ``POST /v1/feedback``, ``GET /v1/trust``, ``GET /metrics``
(Prometheus), ``GET /health`` (never behind the key). Each chat completion says who answered:
headers ``x-dreamroute-tier``, ``x-dreamroute-context``, ``x-dreamroute-atp`` (J),
``x-dreamroute-request-id``, ``x-dreamroute-fast-path``, and a ``dreamroute`` object in the body.

Concurrency: requests run at once, each in a worker thread (an anyio CapacityLimiter sized for
every tier's ``max_in_flight + max_queue``, so a full queue, not the thread pool, is what refuses a
request); the event loop keeps serving ``/health``, ``/metrics`` and fast-path hits meanwhile.
Each tier has its own gate (:mod:`dreamroute.router.gate`): at most ``max_in_flight`` calls at
once, a bounded FIFO queue (``max_queue``); a request waiting for one tier never blocks a request
to another. A full queue is refused at once, and a request that waited longer than
``server.request_timeout_s`` (for a worker and its tiers' turns together) gives up: 503
``tier_busy`` / ``server_busy`` with Retry-After, nothing recorded as an answer. The learned state
is the engine's, under its lock (``Engine.state``). A request whose client disconnects
(:class:`~.generation.Disconnect`, watched while it waits and while it runs) stops within a token
(the backends poll the flag), is recorded as its ATP only, and answers 499; one still waiting for
its tier never runs. Warm-handoff prefills run only when no request is in flight.

Generation options (``stop``, ``logprobs`` / ``top_logprobs``, ``response_format``) are checked by
the schema (:meth:`~.schema.ChatCompletionRequest.options`: 400 naming a field the tiers cannot
honour) and given to every call of the request; a request with any of them skips the fast path.

Streaming: a request that names a tier (``model: TIER``, without ``logprobs``) streams its tokens
as they are generated (:mod:`.streaming`). The router may read a cheap tier's answer before it
commits to it (escalation, audit), so a routed answer (``model: dreamroute``), or one asking for
``logprobs``, is complete before its first chunk is sent: its time to first token is the answer's
latency. A stream is the role chunk, the text (pieces as generated, or word chunks), a final
chunk with ``finish_reason`` and the ``dreamroute`` object, OpenAI's usage chunk when
``stream_options.include_usage``, and ``data: [DONE]``.

Conversations: ``conversation_id`` (body) or ``x-dreamroute-conversation-id`` (header) files a
request under a conversation, whose KV state the reality cache keeps per tier. Without one, a
request with earlier turns gets an id derived from its system prompt, first user message and
``user`` (:func:`~.handlers.derive_conversation_id`), so a client that resends the history
reuses the cache from its third turn on; send an explicit id to reuse it from the second.

The pieces: :class:`~.state.ServerState` (the app's state: worker limiters, the requests in
flight, the deadline) lives in :mod:`.state`; the work behind the chat-completion and feedback
endpoints (answering, feedback, the response and its stream) in :mod:`.handlers`; this module
defines the routes.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from ..api import DreamRoute
from ..config import Settings
from ..signals.metabolic import MetabolicController
from .errors import APIError, install
from .generation import Disconnect
from .guard import Guard
from .dashboard import dashboard_data, dashboard_page
from .handlers import answer_chat, record_feedback, stream_pinned, request_priority, chat_response, answer_summary, derive_conversation_id
from .metabolism import Metabolism
from .schema import ChatCompletionRequest, DreamrouteInfo, FeedbackRequest, MetabolicRequest, Usage
from .state import ServerState

ROUTED = "dreamroute"
CONV_HEADER = "x-dreamroute-conversation-id"


def create_app(settings: Settings, *, dr: DreamRoute | None = None,
               metabolic: MetabolicController | None = None) -> FastAPI:
    """The server app over ``dr``, or over a DreamRoute built from ``settings`` (policy, budget, fast
    path and cooldown from ``settings.server``; closed when the app shuts down).

    Args:
        settings: server settings (``settings.server``) and, when ``dr`` is None, everything else.
        dr: a ready DreamRoute (tests pass one on scripted backends); its policy, budget, fast path
            and cooldown are its own.
        metabolic: the metabolic controller (tests pass one on a fake clock); None: one from
            ``settings.metabolic`` when it is enabled. Its states change what each request may
            spend (``dreamroute.signals.metabolic``); the app's lifespan ticks it every ``tick_s``
            (unloading tiers in REST, running a DREAM cycle in a separate process).
    """
    srv = settings.server
    own = dr is None
    if dr is None:
        dr = DreamRoute(settings, policy=srv.policy, budget=srv.budget, fast_path=srv.fast_path,
                        cooldown_s=srv.cooldown_s)
    st = ServerState(settings, dr, own)
    mc = settings.metabolic
    if metabolic is None and mc.enabled:
        metabolic = MetabolicController(mc, list(dr.engine.tiers))
    if metabolic is not None:
        st.metabolism = Metabolism(st, metabolic, tick_s=mc.tick_s, student=mc.dream_student,
                                   teacher=mc.dream_teacher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.dr.start_sync()   # other routers' experiences into memory (store.sync: on for PostgreSQL)
        async with anyio.create_task_group() as tg:
            if st.metabolism is not None:
                tg.start_soon(st.metabolism.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        st.dr.stop_sync()
        if st.metabolism is not None:
            st.metabolism.stop()
        if st.own:
            st.dr.close()

    app = FastAPI(title="dreamroute", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.dreamroute = st
    install(app, lambda err, req: st.metrics.error(err.status, err.code or err.type,
                                                   req.url.path == "/v1/chat/completions"))
    app.add_middleware(Guard, api_key=srv.api_key, max_bytes=srv.max_request_bytes,
                       on_reject=lambda err: st.metrics.error(err.status, err.code or err.type, False))
    tiers = list(dr.engine.tiers)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        t0 = time.perf_counter()
        if body.model != ROUTED and body.model not in tiers:
            raise APIError(404, f"The model `{body.model}` does not exist. Models here: "
                                f"{', '.join([ROUTED, *tiers])} ({ROUTED} routes; a tier name forces that tier).",
                           param="model", code="model_not_found")
        tier = None if body.model == ROUTED else body.model
        max_tokens = body.limit(srv.default_max_tokens)
        if max_tokens > srv.max_completion_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                f"{srv.max_completion_tokens} (server.max_completion_tokens).", param="max_tokens")
        messages = body.chat()
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise APIError(400, "messages need a user message with text.", param="messages")
        priority = request_priority(body, request)
        header_conv = request.headers.get(CONV_HEADER)
        if header_conv is not None and not 1 <= len(header_conv) <= 200:
            raise APIError(400, f"{CONV_HEADER} must be 1 to 200 characters, got {len(header_conv)}.",
                           param=CONV_HEADER)
        conv = body.conversation_id or header_conv or derive_conversation_id(messages, body.user)
        options = body.options()  # 400 naming a field the tiers cannot honour
        # a cached answer has no logprobs and was generated without stop strings or a JSON mode
        if options.plain and st.fast.enabled and (found := st.fast.lookup(messages, max_tokens, tier)) is not None:
            rid, hit = found
            st.metrics.hit(hit.tier, hit.context, time.perf_counter() - t0)
            info = DreamrouteInfo(request_id=rid, tier=hit.tier, context=hit.context, atp_joules=0.0,
                                  fast_path=True, cached_from=hit.request_id, conversation_id=conv)
            usage = Usage(prompt_tokens=hit.prompt_tokens, completion_tokens=hit.completion_tokens,
                          total_tokens=hit.prompt_tokens + hit.completion_tokens)
            return chat_response(body, rid, hit.text, "stop", usage, info)
        deadline = st.deadline()   # for the tiers' turns (the wait for a worker has its own)
        if body.stream and tier is not None and not (options.logprobs or options.top_logprobs):
            return stream_pinned(st, body, t0, messages, tier, conv, priority, max_tokens, options, deadline)
        gone = Disconnect()  # set when the client disconnects: the generation stops within a token
        ans = await gone.guard(request, lambda: st.run(answer_chat, st, messages, tier, conv, priority, max_tokens,
                                                       options, gone, deadline, request=True, cancel=gone))
        st.answered += 1
        st.metrics.answered(ans, "forced" if tier else "routed", time.perf_counter() - t0)
        usage, info = answer_summary(ans, conv)
        return chat_response(body, ans.request.request_id, ans.text, ans.final.generation.finish_reason, usage, info,
                        BackgroundTask(st.idle), ans.final.generation.token_details)

    @app.get("/v1/models")
    async def models() -> dict:
        names = {t.name: t.model for t in dr.settings.tiers}
        data = [{"id": ROUTED, "object": "model", "created": int(st.started), "owned_by": "dreamroute",
                 "description": f"routed across {', '.join(tiers)} ({dr.policy.name})"}]
        data += [{"id": t, "object": "model", "created": int(st.started), "owned_by": "dreamroute",
                  "description": names.get(t, t)} for t in tiers]
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest) -> dict:
        return await st.run(record_feedback, st, st.fast.resolve(body.id), body)

    @app.get("/v1/trust")
    async def trust() -> dict:
        rows = await anyio.to_thread.run_sync(dr.trust)
        p = dr.pacer
        return {"object": "trust", "trust": rows,
                "pacer": {"lambda": p.lam, "budget_joules": p.budget, "atp_spent_joules": p.spent,
                          "average_atp_joules": p.average, "smoothed_atp_joules": p.smoothed,
                          "routed_requests": p.n, "binding": p.binding},
                "requests": {"served": st.answered + st.fast.hits, "routed": st.answered, "fast_path": st.fast.hits},
                "fast_path": {"enabled": st.fast.enabled, "entries": len(dr.responses or ())},
                "cooldown": dr.engine.cooldown.remaining(),
                "tiers": {t: g.snapshot() for t, g in dr.engine.gates.items()},
                "metabolic": st.metabolism.snapshot() if st.metabolism is not None else None}

    @app.get("/v1/metabolic")
    async def metabolic_state() -> dict:
        if st.metabolism is None:
            raise APIError(404, "This server runs no metabolic controller (metabolic.enabled is false).",
                           code="metabolic_disabled")
        return st.metabolism.snapshot()

    @app.post("/v1/metabolic")
    async def set_metabolic(body: MetabolicRequest) -> dict:
        if st.metabolism is None:
            raise APIError(404, "This server runs no metabolic controller (metabolic.enabled is false).",
                           code="metabolic_disabled")
        st.metabolism.ctl.set_crisis(body.crisis)
        return st.metabolism.snapshot()

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return Response(dashboard_page(), media_type="text/html; charset=utf-8")

    @app.get("/dashboard/data")
    async def dashboard_json() -> dict:
        snap = st.metabolism.snapshot() if st.metabolism is not None else None
        return await anyio.to_thread.run_sync(
            lambda: dashboard_data(dr.store, budget=dr.pacer.budget, metabolic=snap))

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await anyio.to_thread.run_sync(st.metrics.exposition)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "tiers": tiers, "policy": dr.policy.name,
                "store": str(dr.store.path or dr.store.url), "uptime_s": round(time.time() - st.started, 3),
                "busy": st.in_flight > 0, "in_flight": st.in_flight}

    return app
