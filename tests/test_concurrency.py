"""Requests at once (issue 13, "Concurrency"): the learned state stays consistent, each tier has its own
limit and bounded queue (503 + Retry-After when full), a busy tier never blocks another, and a pinned
tier streams as it generates. Scripted tiers, a store per test, no network beyond loopback."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import ServerConfig, Settings, TierConfig
from dreamroute.errors import GenerationCancelled, TierBusyError
from dreamroute.router.gate import TierGate
from dreamroute.server import create_app

from .conftest import problem_answers, scripted_backends, scripted_settings
from .test_server import stored, user


class Jittery:
    """A backend that sleeps a random 0–``max_s`` s before each call, then asks ``inner``; counts the
    calls in flight on it (``peak``)."""

    def __init__(self, inner, max_s: float = 0.01, seed: int = 0):
        self.inner, self.max_s = inner, max_s
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.active = self.peak = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _wait(self):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            s = self.rng.uniform(0, self.max_s)
        time.sleep(s)

    def _done(self):
        with self.lock:
            self.active -= 1

    def generate(self, messages, **kw):
        self._wait()
        try:
            return self.inner.generate(messages, **kw)
        finally:
            self._done()

    def score(self, messages, **kw):
        self._wait()
        try:
            return self.inner.score(messages, **kw)
        finally:
            self._done()


def learned(dr: DreamRoute) -> dict:
    """Every counter the router keeps, in the store and in memory."""
    st, mem = dr.store, dr.memory
    rows = st.experiences(["tier", "role", "outcome", "witness", "model_version_id", "context"])
    report = st.verify_ledger()
    return {
        "experiences": st.count_experiences(),
        "per_tier": Counter((r["tier"], r["role"]) for r in rows),
        "outcomes": Counter((r["tier"], r["outcome"], r["witness"]) for r in rows),
        "ledger": len(st.ledger_entries()), "ledger_ok": report.ok,
        "trust": {(r.tier, r.model_version_id, r.context): (r.alpha, r.beta, r.count) for r in st.trust_table()},
        "memory_trust": {k: (v.alpha, v.beta, v.count) for k, v in mem.trust._states.items()},
        "direct_trust": {k: (v.alpha, v.beta, v.count) for k, v in mem.direct_trust._states.items()},
        "pacer": (dr.pacer.n, dr.pacer.spent),
        "index": len(mem.index), "exp_rows": len(mem.exp_rows),
        "tier_stats": {t: (s.n, s.atp, s.prompt_tokens) for t, s in mem.tier_stats.items()},
        "surprise": {t: (s.n, s.mean) for t, s in mem.surprise.items()},
        "responses": len(dr.responses) if dr.responses is not None else None,
    }


def test_200_concurrent_requests_learn_what_the_same_outcomes_applied_one_by_one_learn(tmp_path):
    items, answers = problem_answers(200, seed=3)
    settings = scripted_settings(tmp_path / "a", forgetting=1.0)       # no forgetting: trust is order-free
    backends = {n: Jittery(b, seed=i) for i, (n, b) in enumerate(scripted_backends(answers).items())}
    dr = DreamRoute(settings, db=tmp_path / "a.db", backends=backends, budget=3.0, fast_path=True, seed=1)
    verdicts: dict[str, list] = {}

    def one(i: int):
        it = items[i]
        rng = random.Random(i)
        if i % 2:   # graded at once, against the gold answer
            ans = dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
        else:       # judged later: feedback, sometimes a changed mind
            ans = dr.complete(it.prompt, grader="gsm8k")
            said = [rng.choice(["success", "failure", 0.8, 0.2])]
            if rng.random() < 0.3:
                said.append("failure" if said[0] in ("success", 0.8) else "success")
            for v in said:
                dr.record_outcome(ans.request.request_id, v, witness="user:test")
            verdicts[ans.request.request_id] = said
        return ans

    with ThreadPoolExecutor(max_workers=48) as pool:
        got = list(pool.map(one, range(len(items))))
    assert max(b.peak for b in backends.values()) >= 8                 # they really ran at once
    concurrent = learned(dr)

    # the same answers and outcomes, applied one by one to a fresh store
    serial = DreamRoute(scripted_settings(tmp_path / "b", forgetting=1.0), db=tmp_path / "b.db",
                        backends=scripted_backends(answers), budget=3.0, fast_path=True, seed=1)
    assert serial.memory.versions == dr.memory.versions
    for ans in got:
        ans._policy = serial.engine.policy_for(ans.request)     # the serial router's own policy learns
        serial.engine.learn(ans, ans.outcomes)
        for v in verdicts.get(ans.request.request_id, ()):
            serial.record_outcome(ans.request.request_id, v, witness="user:test")
    alone = learned(serial)

    assert concurrent["ledger_ok"] and alone["ledger_ok"]
    assert concurrent["experiences"] == sum(len(a.calls) for a in got) and concurrent["pacer"][0] == 200
    assert concurrent["pacer"][1] == pytest.approx(sum(a.atp for a in got))
    assert concurrent["trust"] and concurrent["memory_trust"]
    for key in concurrent:      # the same, up to float rounding of sums taken in another order
        assert _approx(concurrent[key]) == alone[key], key
    dr.close()
    serial.close()


def _approx(v):
    """``v`` with every float (inside dicts, tuples, lists) compared with pytest.approx."""
    if isinstance(v, float):
        return pytest.approx(v, rel=1e-9, abs=1e-9)
    if isinstance(v, dict) and not isinstance(v, Counter):
        return {k: _approx(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return type(v)(_approx(x) for x in v)
    return v


def remote_settings(tmp_path, **server) -> Settings:
    """sensory, tactical scripted; ``remote`` an OpenAI-compatible tier (default max_in_flight 8)."""
    tiers = [TierConfig(name="sensory", model="s", backend="scripted", params_b=0.135),
             TierConfig(name="tactical", model="t", backend="scripted", params_b=0.5),
             TierConfig(name="remote", model="r", backend="openai", base_url="http://127.0.0.1:9/v1", params_b=7)]
    return Settings(tiers=tiers, data_dir=tmp_path, server=ServerConfig(**server))


class Slow(ScriptedBackend):
    """A remote-like tier: each call takes ``seconds`` (slept), or blocks until ``release`` when
    ``gated``; counts the calls in flight (``peak``) and signals ``entered``."""

    def __init__(self, identity, seconds=0.5, gated=False):
        super().__init__(identity, lambda m: f"{identity} answers: 91 is 7 times 13.")
        self.seconds, self.gated = seconds, gated
        self.entered, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.active = self.peak = 0

    def generate(self, messages, **kw):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            self.entered.set()
            if self.gated:
                assert self.release.wait(30)
            else:
                time.sleep(self.seconds)
            return super().generate(messages, **kw)
        finally:
            with self.lock:
                self.active -= 1


def post(http, model, text, **kw):
    return http.post("/v1/chat/completions", json={"model": model, "messages": user(text), **kw})


def test_32_requests_to_a_remote_tier_run_8_at_a_time(tmp_path):
    settings = remote_settings(tmp_path)
    remote = Slow("sha-remote", 0.5)
    dr = DreamRoute(settings, db=tmp_path / "s.db", cooldown_s=60.0,
                    backends={"sensory": ScriptedBackend("sha-s", lambda m: "s"),
                              "tactical": ScriptedBackend("sha-t", lambda m: "t"), "remote": remote})
    app = create_app(settings, dr=dr)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as http:
            return await _gather([lambda i=i: post(http, "remote", f"Question {i}?") for i in range(32)])
    rs = anyio.run(main)
    assert [r.status_code for r in rs] == [200] * 32
    assert remote.peak == 8 and dr.gates["remote"].peak == 8          # its max_in_flight, no more, no fewer
    assert dr.store.count_experiences() == 32 and dr.pacer.n == 32
    dr.close()


async def _gather(calls):
    out = [None] * len(calls)

    async def run(i):
        out[i] = await calls[i]()
    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return out


async def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        await anyio.sleep(0.01)


def test_a_full_queue_answers_503_with_retry_after_and_a_busy_tier_does_not_block_another(tmp_path):
    settings = remote_settings(tmp_path)
    settings.tiers[2] = settings.tiers[2].model_copy(update={"max_in_flight": 1, "max_queue": 1})
    remote = Slow("sha-remote", gated=True)
    dr = DreamRoute(settings, db=tmp_path / "s.db", cooldown_s=60.0,
                    backends={"sensory": ScriptedBackend("sha-s", lambda m: "sensory says 13"),
                              "tactical": ScriptedBackend("sha-t", lambda m: "t"), "remote": remote})
    app = create_app(settings, dr=dr)
    gate = dr.gates["remote"]
    seen = {}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as http:
            async def first():
                seen["first"] = await post(http, "remote", "First?")

            async def second():
                seen["second"] = await post(http, "remote", "Second?")
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await _until(remote.entered.is_set)                     # running
                tg.start_soon(second)
                await _until(lambda: gate.waiting == 1)                 # waiting its turn
                before = stored(dr, tmp_path / "s.db")
                full = await post(http, "remote", "Third?")
                seen["full"] = (full, stored(dr, tmp_path / "s.db") == before)
                other = await post(http, "sensory", "Meanwhile, another tier?")
                seen["other"] = (other, gate.in_flight, gate.waiting)
                remote.release.set()
    anyio.run(main)
    full, unchanged = seen["full"]
    assert full.status_code == 503 and full.json()["error"]["code"] == "tier_busy"
    assert int(full.headers["retry-after"]) >= 1 and full.json()["error"]["type"] == "server_error"
    assert unchanged                                                     # nothing recorded of it
    other, in_flight, waiting = seen["other"]
    assert other.status_code == 200 and (in_flight, waiting) == (1, 1)  # answered while remote was full
    assert seen["first"].status_code == seen["second"].status_code == 200
    assert len(remote.calls) == 2 and gate.refused == 1
    rows = dr.store.experiences(["tier"])
    assert sorted(r["tier"] for r in rows) == ["remote", "remote", "sensory"]
    dr.close()


def test_the_api_refuses_a_full_tier_and_a_waiter_that_times_out_or_leaves(tmp_path):
    settings = scripted_settings(tmp_path)
    settings.tiers[1] = settings.tiers[1].model_copy(update={"max_in_flight": 1, "max_queue": 1})
    slow = Slow("sha-tactical", gated=True)
    backends = {**scripted_backends({}), "tactical": slow}
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends) as dr:
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(dr.complete, "Slow one?", tier="tactical")
            assert slow.entered.wait(20)
            waiting = pool.submit(dr.complete, "Waits?", tier="tactical", queue_timeout_s=20)
            for _ in range(2000):
                if dr.gates["tactical"].waiting:
                    break
                time.sleep(0.005)
            with pytest.raises(TierBusyError) as e:
                dr.complete("No room?", tier="tactical")
            assert e.value.tier == "tactical" and e.value.retry_after_s >= 1 and e.value.status == 503
            slow.release.set()
            assert running.result(20).tier == waiting.result(20).tier == "tactical"
        slow.release.clear()
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(dr.complete, "Slow again?", tier="tactical")
            for _ in range(2000):
                if dr.gates["tactical"].in_flight:
                    break
                time.sleep(0.005)
            t0 = time.monotonic()
            with pytest.raises(TierBusyError, match="stayed busy"):
                dr.complete("Short wait?", tier="tactical", queue_timeout_s=0.2)
            assert time.monotonic() - t0 < 5
            gone = threading.Event()
            left = pool.submit(dr.complete, "Leaves?", tier="tactical", cancel=gone.is_set)
            time.sleep(0.1)
            gone.set()
            with pytest.raises(GenerationCancelled) as c:
                left.result(20)
            assert c.value.queued and c.value.tier == "tactical"
            slow.release.set()
            running.result(20)
        assert len(slow.calls) == 3 and dr.store.count_experiences() == 3
        assert not [r for r in dr.store.experiences(["prompt"]) if r["prompt"] in ("Short wait?", "Leaves?")]


async def _raw_stream(app, body: dict, on_chunk) -> tuple[int, list[bytes]]:
    """POST straight into the ASGI app, calling ``on_chunk(bytes)`` as each body part is sent."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    sent, parts, status, done = False, [], None, anyio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body":
            parts.append(msg.get("body", b""))
            on_chunk(msg.get("body", b""))
            if not msg.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return status, parts


class Paced(ScriptedBackend):
    """Sends its first word, then waits for ``go`` before generating the rest (``ended`` set after)."""

    def __init__(self, identity, text):
        super().__init__(identity, lambda m: text)
        self.go, self.ended = threading.Event(), threading.Event()
        self.saw_go_before_end = None

    def generate(self, messages, on_text=None, **kw):
        first = []

        def relay(piece):
            on_text(piece)
            if not first:
                first.append(piece)
                self.saw_go_before_end = self.go.wait(10)   # the client must see it while we generate
        try:
            return super().generate(messages, on_text=relay if on_text else None, **kw)
        finally:
            self.ended.set()


def test_a_pinned_tier_streams_its_first_chunk_before_the_generation_ends(tmp_path):
    settings = scripted_settings(tmp_path)
    text = "one two three four five six seven"
    paced = Paced("sha-tactical", text)
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends={**scripted_backends({}), "tactical": paced})
    app = create_app(settings, dr=dr)
    order = []

    def on_chunk(b: bytes):
        if b'"content":"one' in b:
            order.append(("first chunk", paced.ended.is_set()))
            paced.go.set()
    status, parts = anyio.run(lambda: _raw_stream(app, {"model": "tactical", "messages": user("Count?"),
                                                        "stream": True, "stream_options": {"include_usage": True}},
                                                  on_chunk))
    assert status == 200 and paced.saw_go_before_end is True
    assert order == [("first chunk", False)]                              # sent while still generating
    events = [json.loads(line[6:]) for p in parts for line in p.decode().splitlines()
              if line.startswith("data: {")]
    assert b"".join(parts).endswith(b"data: [DONE]\n\n")
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == text
    assert events[-2]["dreamroute"]["tier"] == "tactical" and events[-1]["usage"]["completion_tokens"] == 7
    assert events[0]["id"] == "chatcmpl-" + events[-2]["dreamroute"]["request_id"]
    assert dr.store.count_experiences() == 1
    dr.close()


def test_a_pinned_stream_refused_before_its_first_chunk_is_an_ordinary_error(tmp_path):
    settings = scripted_settings(tmp_path)
    settings.tiers[1] = settings.tiers[1].model_copy(update={"max_in_flight": 1, "max_queue": 0})
    slow = Slow("sha-tactical", gated=True)
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends={**scripted_backends({}), "tactical": slow})
    app = create_app(settings, dr=dr)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as http:
            async with anyio.create_task_group() as tg:
                tg.start_soon(post, http, "tactical", "Runs?")
                await _until(slow.entered.is_set)
                busy = await post(http, "tactical", "Streams?", stream=True)
                slow.release.set()
        return busy
    busy = anyio.run(main)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "tier_busy" and busy.headers["retry-after"]
    assert dr.store.count_experiences() == 1
    dr.close()


def test_gate_admits_in_order_and_exclusive_waits_for_calls_in_flight():
    gate = TierGate("t", 2, 8)
    order, lock = [], threading.Lock()
    hold = threading.Event()

    def call(i):
        with gate.slot():
            with lock:
                order.append(i)
            hold.wait(10)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    while gate.in_flight < 2:
        time.sleep(0.001)
    for i in range(2, 6):   # queued in this order
        threads.append(threading.Thread(target=call, args=(i,)))
        threads[-1].start()
        while gate.waiting < i - 1:
            time.sleep(0.001)
    with gate.exclusive(timeout=0) as held:
        assert not held                                                  # calls in flight: not taken
    hold.set()
    for t in threads:
        t.join(10)
    assert order[:2] == sorted(order[:2]) == [0, 1] and order[2:] == [2, 3, 4, 5]
    assert gate.peak == 2 and gate.idle
    with gate.exclusive(timeout=0) as held:
        assert held and not gate.try_acquire()
    assert gate.try_acquire()
    gate.release()


def test_a_busy_escalation_keeps_the_answer_it_had_and_is_not_a_failure(tmp_path):
    settings = scripted_settings(tmp_path)
    settings.tiers[1] = settings.tiers[1].model_copy(update={"max_in_flight": 1, "max_queue": 0})
    slow = Slow("sha-tactical", gated=True)
    backends = {**scripted_backends({}, skill=(0, 2, 5)), "tactical": slow}
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="cascade:0.99",
                    cooldown_s=60.0) as dr, ThreadPoolExecutor(2) as pool:
        running = pool.submit(dr.complete, "Busy?", tier="tactical")
        assert slow.entered.wait(20)
        ans = dr.complete("What is 2 + 2?")                      # sensory answers, unsure: escalates
        assert ans.tier == "sensory" and [c.role for c in ans.calls] == ["chosen"] and not ans.failures
        assert dr.gates["tactical"].refused == 1                 # it did try to escalate
        assert dr.engine.cooldown.remaining() == {}              # busy is not failing: nothing cooled
        slow.release.set()
        running.result(20)


def test_tier_limits_config():
    from dreamroute.config import ModelSource
    t = TierConfig(name="r", model="m", backend="openai", base_url="http://127.0.0.1:9/v1")
    assert (t.in_flight, t.max_queue) == (8, 64)
    assert TierConfig(name="s", model="m", backend="scripted").in_flight == 64
    src = ModelSource(gguf="/nonexistent.gguf")
    assert TierConfig(name="l", model="m", source=src).in_flight == 1
    with pytest.raises(ValueError, match="max_in_flight must be 1"):
        TierConfig(name="l", model="m", source=src, max_in_flight=2)
    assert TierConfig(name="r", model="m", backend="openai", base_url="http://x/v1", max_in_flight=32).in_flight == 32


def test_a_streaming_client_that_hangs_up_over_a_socket_stops_the_generation(tmp_path):
    from .test_server import make
    from .test_server_disconnect import TOKEN_S, cancelled_rows, slow_tiers
    from .test_server_live import served

    c, dr = make(tmp_path, slow_tiers())
    with served(c.app) as url, httpx.Client(base_url=url, trust_env=False, timeout=10) as http:
        t0 = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json={"model": "specialized", "messages": user("Long?"),
                                                                "max_tokens": 400, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if '"content":" w1' in line:
                    break                                          # two words in: hang up
        deadline = time.monotonic() + 5
        while not cancelled_rows(tmp_path / "s.db") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - t0 < 400 * TOKEN_S / 4             # far from the 20 s answer
    (tier, tokens, _, _), = cancelled_rows(tmp_path / "s.db")
    assert tier == "specialized" and dr.store.count_experiences() == 0


def test_refresh_versions_waits_for_the_requests_in_flight_and_holds_new_ones_off(tmp_path):
    settings = scripted_settings(tmp_path)
    slow = Slow("sha-tactical", gated=True)
    with DreamRoute(settings, db=tmp_path / "s.db", backends={**scripted_backends({}), "tactical": slow}) as dr, \
            ThreadPoolExecutor(4) as pool:
        running = pool.submit(dr.complete, "Busy?", tier="tactical")
        assert slow.entered.wait(20)
        dr._versions_changed = lambda: True                   # as after a promotion in another process
        refreshing = pool.submit(dr.refresh_versions)
        time.sleep(0.2)
        assert not refreshing.done()                            # waits: a request is in flight
        later = pool.submit(dr.complete, "After?", tier="sensory")
        time.sleep(0.2)
        assert not later.done()                                 # held off while the swap waits
        slow.release.set()
        assert running.result(20).tier == "tactical"
        refreshing.result(20)
        assert later.result(20).tier == "sensory" and dr.store.count_experiences() == 2
