"""A loopback OpenAI-compatible upstream that answers every request after a fixed latency.

    .venv/bin/python benchmarks/fake_upstream.py --port 8101 --latency-ms 200

What `benchmarks/serve_load.py` and `benchmarks/federation.py` put behind dreamroute as a remote
tier whose speed is known: each ``POST /v1/chat/completions`` (plain or ``stream: true``) waits
``--latency-ms`` (an ``asyncio.sleep``, so any number of requests wait at once, as a batching
server's would) and answers ``"The answer is N."`` with N the first integer of the last user
message (0 if none), with OpenAI's ``usage``. ``GET /v1/models`` lists ``--model``.

Per request it keeps how long it held the request, from the moment its handler started to the
moment the body was handed back, keyed by the first ``[req:ID]`` tag of the last user message:
``GET /stats`` returns ``{"requests": n, "held_ms": {ID: ms}}`` and ``DELETE /stats`` clears it.
A benchmark subtracts that from the latency its client saw to get what the router in between
cost (both on this machine's clock, so nothing needs synchronising).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TAG = re.compile(r"\[req:([\w.-]+)\]")
NUMBER = re.compile(r"-?\d+")


def create_app(latency_s: float, model: str) -> FastAPI:
    """The upstream app: answers after ``latency_s`` seconds; ``model`` is its one model id."""
    app = FastAPI()
    held: dict[str, float] = {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]}

    @app.get("/stats")
    async def stats():
        return {"requests": len(held), "held_ms": held}

    @app.delete("/stats")
    async def clear():
        held.clear()
        return {"cleared": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        body = await request.json()
        msgs = body.get("messages") or [{"content": ""}]
        last = str(msgs[-1].get("content", ""))
        tag = TAG.search(last)
        num = NUMBER.search(TAG.sub("", last))
        text = f"The answer is {num.group(0) if num else 0}."
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in msgs) // 4 + 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}
        await asyncio.sleep(latency_s)
        rid = f"chatcmpl-fake-{int(t0 * 1e6)}"
        if body.get("stream"):
            async def events():
                for i, piece in enumerate(text.split(" ")):
                    delta = {"role": "assistant", "content": piece} if i == 0 else {"content": " " + piece}
                    yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "model": model,
                                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"
                yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "model": model,
                                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                             "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
                if tag:
                    held[tag.group(1)] = (time.perf_counter() - t0) * 1e3
            return StreamingResponse(events(), media_type="text/event-stream")
        out = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
               "usage": usage}
        if tag:
            held[tag.group(1)] = (time.perf_counter() - t0) * 1e3
        return JSONResponse(out)

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--model", default="fake")
    a = ap.parse_args()
    uvicorn.run(create_app(a.latency_ms / 1e3, a.model), host=a.host, port=a.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
