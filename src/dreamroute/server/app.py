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
``user`` (:func:`derive_conversation_id`), so a client that resends the history reuses the cache
from its third turn on; send an explicit id to reuse it from the second.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.lowlevel import RunVar
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..api import DreamRoute
from ..backends.base import Message
from ..cache.response import messages_key
from ..config import Settings
from ..errors import BackendError, GenerationCancelled, TierBusyError
from ..router.types import Answer
from ..metabolic import MetabolicController
from .errors import APIError, install
from .fastpath import RESPONSE_PREFIX, FastPath
from .generation import POLL_S, Disconnect, logprobs_body, stream_pieces
from .guard import Guard
from .dashboard import dashboard_data, dashboard_page
from .metabolism import Metabolism
from .metrics import ServerMetrics
from .schema import (AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, DreamrouteInfo,
                     FeedbackRequest, MetabolicRequest, Usage, chunk)
from .streaming import LiveStream

ROUTED = "dreamroute"
CONV_HEADER = "x-dreamroute-conversation-id"
PRIORITY_HEADER = "x-dreamroute-priority"
SPARE_WORKERS = 16
"""Worker threads beyond the tiers' ``max_in_flight + max_queue`` (feedback, token counting)."""
_LIMITERS: RunVar[weakref.WeakKeyDictionary] = RunVar("dreamroute_limiters")  # per event loop: state → limiters


def derive_conversation_id(messages: list[Message], user: str | None = None) -> str | None:
    """``auto-<hash>`` of the system prompt(s), the first user message and ``user`` when the
    request has earlier turns (more than one user message), else None. Deterministic, so every
    turn of a conversation a client resends gets the same id; two conversations that open alike
    share it, which costs nothing wrong: a KV state is reused only when its tokens are a prefix
    of the new prompt."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(users) < 2:
        return None
    head = [m for m in messages[:users[0]] if m["role"] == "system"] + [messages[users[0]]]
    return "auto-" + hashlib.sha256(f"{messages_key(head)}|{user or ''}".encode()).hexdigest()[:32]


class ServerState:
    """Everything one app holds (no module-level state): settings, the DreamRoute, metrics, the fast
    path, the start time, the metabolism (None when it is off) and the requests in flight.

    Attributes:
        in_flight: model requests running or waiting now (counted in the event loop).
        capacity: worker threads at most: every tier's ``max_in_flight + max_queue``, plus
            :data:`SPARE_WORKERS`.
    """

    def __init__(self, settings: Settings, dr: DreamRoute, own: bool):
        self.settings, self.dr, self.own = settings, dr, own
        self.metabolism: Metabolism | None = None
        self.in_flight = 0
        self.capacity = sum(g.limit + g.max_queue for g in dr.engine.gates.values()) + SPARE_WORKERS
        self.metrics = ServerMetrics(dr, lambda: self.metabolism)
        self.fast = FastPath(dr)
        self.started = time.time()
        self.answered = 0
        dr.engine.on_failure = lambda f: self.metrics.backend_failures.labels(f.tier).inc()

    async def run(self, fn, *args, request: bool = False, cancel: Disconnect | None = None) -> Any:
        """``fn(*args)`` in a worker thread (503 ``server_busy`` when none is free within
        ``request_timeout_s``). ``request``: a model request, counted in flight (here and by the
        metabolism) from now, its waits included, until it ends, answered or not: no REST, DREAM or
        warm-handoff prefill starts meanwhile, and idle time counts from its end. ``cancel``: a
        request still waiting for a worker when its client disconnects gives up (GenerationCancelled)
        without running ``fn``."""
        timeout = self.settings.server.request_timeout_s
        ctl = self.metabolism.ctl if request and self.metabolism is not None else None
        if request:
            self.in_flight += 1
        if ctl is not None:
            ctl.begin_request()
        try:
            return await self._run(fn, args, timeout, cancel)
        finally:
            if request:
                self.in_flight -= 1
            if ctl is not None:
                ctl.end_request()

    def _limiters(self) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter]:
        """This event loop's (slots, threads) limiters of :attr:`capacity` each: a slot is waited
        for with a timeout, then the thread runs under the other (never the one that waits)."""
        try:
            per_loop = _LIMITERS.get()
        except LookupError:
            per_loop = weakref.WeakKeyDictionary()
            _LIMITERS.set(per_loop)
        if self not in per_loop:
            per_loop[self] = (anyio.CapacityLimiter(self.capacity), anyio.CapacityLimiter(self.capacity))
        return per_loop[self]

    async def _run(self, fn, args, timeout: float, cancel: Disconnect | None = None) -> Any:
        """``fn(*args)`` in a worker thread once one is free (503 after ``timeout`` s;
        GenerationCancelled when ``cancel`` is set first)."""
        slots, threads = self._limiters()
        deadline = time.monotonic() + timeout
        got = False
        while not got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(503, f"The server stayed busy for {timeout:g} s ({self.capacity} requests at "
                                    "once); retry later.", code="server_busy", headers={"Retry-After": "1"})
            with anyio.move_on_after(min(POLL_S, left) if cancel is not None else left):
                await slots.acquire()
                got = True
            if not got and cancel is not None and cancel():
                raise GenerationCancelled("the client went away while the request waited for a worker")
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=threads)
        finally:
            slots.release()

    def deadline(self) -> float:
        """``time.monotonic()`` by which a request arriving now must have its tiers' turns."""
        return time.monotonic() + self.settings.server.request_timeout_s

    async def idle(self) -> None:
        """Between requests: run one queued warm-handoff prefill if no request is in flight."""
        kv = self.dr.engine.kv
        if kv is None or not kv.pending or self.in_flight:
            return

        def work():
            if self.in_flight == 0:
                self.dr.idle(1)   # skips a job whose tier is busy (Engine.idle)
        await anyio.to_thread.run_sync(work)


def count_prompt_tokens(dr: DreamRoute, messages: list[Message], tier: str | None, *, cancel=None,
                        deadline: float | None = None) -> int:
    """Prompt tokens under the chat template of ``tier`` (or the cheapest available tier); about
    one per 4 characters where that backend has no tokenizer (a remote server). A tier that runs
    one call at a time (``max_in_flight`` 1: llama.cpp in process) is asked in its turn (its
    gate; TierBusyError / GenerationCancelled as a call's wait)."""
    name = tier or (dr.engine.cooldown.available() or dr.engine.tiers)[0]
    gate = dr.engine.gates.get(name)
    try:
        if gate is not None and gate.limit == 1:
            with gate.slot(cancel=cancel, deadline=deadline):
                return len(dr.backends[name].prompt_tokens(messages))
        return len(dr.backends[name].prompt_tokens(messages))
    except BackendError as e:
        if isinstance(e, TierBusyError):
            raise
        return sum(len(m["content"]) + 16 for m in messages) // 4


def _answer(st: ServerState, messages, tier, conv, priority, max_tokens, options=None, cancel=None,
            deadline: float | None = None, on_text=None, request_id: str | None = None):
    """In a worker thread: refuse a named tier that is cooling down (503, nothing called), check the
    prompt's length, then answer (waiting for the tiers' turns until ``deadline``, monotonic s)."""
    settings = st.settings
    if tier is not None:
        st.dr.engine.faults.check(tier)
    n = count_prompt_tokens(st.dr, messages, tier, cancel=cancel, deadline=deadline)
    ctx, limit = settings.context_tokens, settings.max_prompt_tokens
    if n > limit:
        raise APIError(400, f"The messages are {n} tokens; this server accepts at most {limit} "
                            "(server.max_prompt_tokens). Shorten the messages.",
                       param="messages", code="context_length_exceeded")
    if n + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the completion). "
                            "Please reduce the length of the messages or completion.",
                       param="messages", code="context_length_exceeded")
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    return st.dr.complete(messages, conversation_id=conv, priority=priority, max_tokens=max_tokens, tier=tier,
                          options=options, cancel=cancel, on_text=on_text, queue_timeout_s=wait,
                          request_id=request_id)


def _feedback(st: ServerState, rid: str, body: FeedbackRequest) -> dict:
    """In a worker thread, under the engine's state lock: a user's verdict on a response (witness
    ``user:api``)."""
    with st.dr.engine.state:
        return _feedback_locked(st, rid, body)


def _feedback_locked(st: ServerState, rid: str, body: FeedbackRequest) -> dict:
    rows = [r for r in st.dr.store.experiences_for_request(rid) if r["role"] != "audit"]
    if not rows:
        raise APIError(404, f"No response with id {body.id!r} is on record; send the id of a chat completion "
                            "(chatcmpl-...) or its dreamroute.request_id.", param="id", code="response_not_found")
    row = rows[-1]
    vid, ctx = row["model_version_id"], row["context"]
    before = st.dr.memory.trust.get(vid, ctx).mean
    oc = st.dr.record_outcome(rid, body.outcome if body.outcome is not None else body.rating, witness="user:api")
    return {"object": "feedback", "id": body.id, "request_id": rid, "outcome": oc.outcome, "reward": oc.reward,
            "witness": oc.witness, "tier": row["tier"], "context": ctx, "trust_before": before,
            "trust_after": st.dr.memory.trust.get(vid, ctx).mean}


def _summary(ans: Answer, conv: str | None) -> tuple[Usage, DreamrouteInfo]:
    """An answer's ``usage`` and ``dreamroute`` object."""
    gens = [c.generation for c in ans.calls]
    p, c = sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)
    usage = Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c,
                  prompt_tokens_details={"cached_tokens": sum(g.cached_tokens for g in gens)})
    info = DreamrouteInfo(request_id=ans.request.request_id, tier=ans.tier, context=ans.decision.context,
                          atp_joules=ans.atp, kv_restored=ans.kv_restored, escalated=ans.escalated,
                          audited=ans.audited, conversation_id=conv,
                          calls=[{"tier": c.tier, "role": c.role, "atp_joules": c.atp} for c in ans.calls],
                          failed_tiers=[f.to_dict() for f in ans.failures], metabolic_state=ans.metabolic_state,
                          surprise_atp_joules=ans.surprise_atp)
    return usage, info


def _live(st: ServerState, body: ChatCompletionRequest, t0: float, messages, tier: str, conv, priority,
          max_tokens: int, options, deadline: float) -> LiveStream:
    """The stream of a pinned request, sent as it is generated (:mod:`.streaming`)."""
    rid = uuid.uuid4().hex
    cid, created = RESPONSE_PREFIX + rid, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if with_usage else {}

    async def work(on_text, gone: Disconnect) -> Answer:
        ans = await st.run(_answer, st, messages, tier, conv, priority, max_tokens, options, gone, deadline, on_text,
                           rid, request=True, cancel=gone)
        st.answered += 1
        st.metrics.answered(ans, "forced", time.perf_counter() - t0)
        return ans

    def tail(ans: Answer) -> bytes:
        usage, info = _summary(ans, conv)
        out = [_sse(chunk(cid, body.model, created, {}, ans.final.generation.finish_reason,
                          dreamroute=info.model_dump(), **extra))]
        if with_usage:
            out.append(_sse(chunk(cid, body.model, created, None, usage=usage.model_dump())))
        return ("".join(out) + "data: [DONE]\n\n").encode()

    headers = {"x-dreamroute-tier": tier, "x-dreamroute-request-id": rid, "x-dreamroute-fast-path": "0"}
    return LiveStream(work, lambda delta: chunk(cid, body.model, created, delta, **extra), tail, headers,
                      lambda err: st.metrics.error(err.status, err.code or err.type, True), BackgroundTask(st.idle))


def _respond(body: ChatCompletionRequest, rid: str, text: str, finish: str, usage: Usage, info: DreamrouteInfo,
             background: BackgroundTask | None = None, details=None) -> Response:
    """The chat completion (or its stream) of an answer; ``details``: its token details when
    ``logprobs`` was asked (``choices[0].logprobs``, per chunk in a stream)."""
    cid = RESPONSE_PREFIX + rid
    headers = {"x-dreamroute-tier": info.tier, "x-dreamroute-context": info.context,
               "x-dreamroute-atp": f"{info.atp_joules:.4f}", "x-dreamroute-request-id": rid,
               "x-dreamroute-fast-path": "1" if info.fast_path else "0"}
    if not body.stream:
        out = ChatCompletion(id=cid, model=body.model, usage=usage, dreamroute=info,
                             choices=[Choice(message=AssistantMessage(content=text), finish_reason=finish,
                                             logprobs=logprobs_body(details))])
        return JSONResponse(out.model_dump(), headers=headers, background=background)
    created = int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if with_usage else {}

    async def events():
        yield _sse(chunk(cid, body.model, created, {"role": "assistant", "content": ""}, **extra))
        for piece, lps in stream_pieces(text, details):
            yield _sse(chunk(cid, body.model, created, {"content": piece}, logprobs=lps, **extra))
        yield _sse(chunk(cid, body.model, created, {}, finish, dreamroute=info.model_dump(), **extra))
        if with_usage:
            yield _sse(chunk(cid, body.model, created, None, usage=usage.model_dump()))
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", background=background,
                             headers={**headers, "cache-control": "no-cache"})


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def _priority(body: ChatCompletionRequest, request: Request) -> float:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return body.priority or 0.0
    try:
        p = float(raw)
    except ValueError:
        p = float("nan")
    if not 0.0 <= p <= 1.0:
        raise APIError(400, f"{PRIORITY_HEADER} must be a number in [0, 1], got {raw!r}", param=PRIORITY_HEADER)
    return p


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
            spend (``dreamroute.metabolic``); the app's lifespan ticks it every ``tick_s``
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
        priority = _priority(body, request)
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
            return _respond(body, rid, hit.text, "stop", usage, info)
        deadline = st.deadline()   # for the tiers' turns (the wait for a worker has its own)
        if body.stream and tier is not None and not (options.logprobs or options.top_logprobs):
            return _live(st, body, t0, messages, tier, conv, priority, max_tokens, options, deadline)
        gone = Disconnect()  # set when the client disconnects: the generation stops within a token
        ans = await gone.guard(request, lambda: st.run(_answer, st, messages, tier, conv, priority, max_tokens,
                                                       options, gone, deadline, request=True, cancel=gone))
        st.answered += 1
        st.metrics.answered(ans, "forced" if tier else "routed", time.perf_counter() - t0)
        usage, info = _summary(ans, conv)
        return _respond(body, ans.request.request_id, ans.text, ans.final.generation.finish_reason, usage, info,
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
        return await st.run(_feedback, st, st.fast.resolve(body.id), body)

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
