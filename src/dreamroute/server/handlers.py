"""The work behind the chat-completion and feedback endpoints of
:func:`~dreamroute.server.app.create_app`: answering a request in a worker thread (prompt length
checks, then the DreamRoute), recording feedback, and turning an answer into a chat completion,
its stream (:mod:`.streaming` for a pinned tier) and its ``usage`` / ``dreamroute`` objects; also
the request's priority and the conversation id derived from its history.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..api import DreamRoute
from ..backends.base import Message
from ..cache.response import messages_key
from ..errors import BackendError, TierBusyError
from ..router.types import Answer
from .errors import APIError
from .fastpath import RESPONSE_PREFIX
from .generation import Disconnect, logprobs_body, stream_pieces
from .schema import (AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, DreamrouteInfo,
                     FeedbackRequest, Usage, chunk)
from .state import ServerState
from .streaming import LiveStream

PRIORITY_HEADER = "x-dreamroute-priority"


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


def answer_chat(st: ServerState, messages, tier, conv, priority, max_tokens, options=None, cancel=None,
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


def record_feedback(st: ServerState, rid: str, body: FeedbackRequest) -> dict:
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


def answer_summary(ans: Answer, conv: str | None) -> tuple[Usage, DreamrouteInfo]:
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


def stream_pinned(st: ServerState, body: ChatCompletionRequest, t0: float, messages, tier: str, conv, priority,
          max_tokens: int, options, deadline: float) -> LiveStream:
    """The stream of a pinned request, sent as it is generated (:mod:`.streaming`)."""
    rid = uuid.uuid4().hex
    cid, created = RESPONSE_PREFIX + rid, int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if with_usage else {}

    async def work(on_text, gone: Disconnect) -> Answer:
        ans = await st.run(answer_chat, st, messages, tier, conv, priority, max_tokens, options, gone, deadline, on_text,
                           rid, request=True, cancel=gone)
        st.answered += 1
        st.metrics.answered(ans, "forced", time.perf_counter() - t0)
        return ans

    def tail(ans: Answer) -> bytes:
        usage, info = answer_summary(ans, conv)
        out = [_sse(chunk(cid, body.model, created, {}, ans.final.generation.finish_reason,
                          dreamroute=info.model_dump(), **extra))]
        if with_usage:
            out.append(_sse(chunk(cid, body.model, created, None, usage=usage.model_dump())))
        return ("".join(out) + "data: [DONE]\n\n").encode()

    headers = {"x-dreamroute-tier": tier, "x-dreamroute-request-id": rid, "x-dreamroute-fast-path": "0"}
    return LiveStream(work, lambda delta: chunk(cid, body.model, created, delta, **extra), tail, headers,
                      lambda err: st.metrics.error(err.status, err.code or err.type, True), BackgroundTask(st.idle))


def chat_response(body: ChatCompletionRequest, rid: str, text: str, finish: str, usage: Usage, info: DreamrouteInfo,
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


def request_priority(body: ChatCompletionRequest, request: Request) -> float:
    """The request's priority in [0, 1] (SNARC's arousal): the ``x-dreamroute-priority`` header, else the
    body's ``priority``, else 0. Raises APIError (400) for a header that is no number in [0, 1]."""
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
