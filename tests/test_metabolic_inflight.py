"""REST (unloading) and DREAM never start while a request runs, and idle time counts from the end
of the last request (metabolic.py begin_request / end_request, server/metabolism.py, ServerState.run)."""

from __future__ import annotations

import threading
import time

import anyio
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamroute import DreamRoute
from dreamroute.config import MetabolicConfig
from dreamroute.signals.metabolic import MetabolicController, State
from dreamroute.server import create_app

from .conftest import TIERS, scripted_settings
from .test_server_metabolic import Q, Clock, Loadable

# ------------------------------------------------------------------ the controller, as a property

ops = st.lists(st.one_of(st.just(("start",)), st.just(("finish",)), st.just(("tick",)),
                         st.tuples(st.just("wait"), st.floats(0.0, 30.0, allow_nan=False))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.sampled_from([0.0, 5.0, 10.0]), st.sampled_from([0.0, 10.0]), st.sampled_from([0, 1]))
def test_rest_and_dream_start_only_with_no_request_in_flight_counted_from_the_last_end(seq, rest, extra, backlog):
    clock = Clock()
    cfg = MetabolicConfig(rest_after_s=rest, dream_after_s=rest + extra, dream_min_backlog=1)
    ctl = MetabolicController(cfg, list(TIERS), clock=clock)
    flying, last_end = 0, clock.t
    for op in seq:
        if op[0] == "start":
            ctl.begin_request()
            ctl.on_request(0.0, 0.0)
            flying += 1
        elif op[0] == "finish" and flying:
            ctl.on_answer(1.0)
            ctl.end_request()
            flying -= 1
            last_end = clock.t
        elif op[0] == "wait":
            clock.t += op[1]
        elif op[0] == "tick":
            was = ctl.state
            actions = ctl.tick(backlog)
            idle = clock.t - last_end
            assert ctl.idle_s() == (0.0 if flying else idle)
            for a in actions:
                assert not flying, (a, flying)
                assert idle >= (rest if a.kind == "unload" else rest + extra)
            if flying:
                assert ctl.state is was or ctl.state is State.WAKE     # only CRISIS can end meanwhile
            elif was in (State.WAKE, State.FOCUS) and idle >= rest:
                assert ctl.state in (State.REST, State.DREAM)
    assert ctl.in_flight == flying


# ------------------------------------------------------------------ the server, with a slow request

class Gated(Loadable):
    """Blocks inside generate() until released: a request that is still running."""

    def __init__(self, identity):
        super().__init__(identity)
        self.entered, self.release = threading.Event(), threading.Event()
        self.gated = False

    def generate(self, messages, **kw):
        if self.gated:
            self.entered.set()
            assert self.release.wait(60)
        return super().generate(messages, **kw)


def make(tmp_path):
    clock = Clock()
    mc = MetabolicConfig(rest_after_s=10, dream_after_s=20, dream_min_backlog=1)
    settings_ = scripted_settings(tmp_path).model_copy(update={"metabolic": mc})
    backends = {n: Gated(f"sha-{n}") for n in TIERS}
    dr = DreamRoute(settings_, db=tmp_path / "s.db", backends=backends, budget=1.0, cooldown_s=60.0)
    ctl = MetabolicController(mc, TIERS, clock=clock)
    app = create_app(settings_, dr=dr, metabolic=ctl)
    return TestClient(app), dr, app.state.dreamroute.metabolism, clock


def test_a_slow_request_in_flight_holds_off_rest_and_dream_and_idle_counts_from_its_end(tmp_path):
    c, dr, m, clock = make(tmp_path)
    try:
        rid = c.post("/v1/chat/completions", json={"model": "specialized", "messages": Q}).json()["dreamroute"]
        assert c.post("/v1/feedback", json={"id": rid["request_id"], "outcome": "success"}).status_code == 200
        slow = dr.backends["specialized"]
        slow.gated = True
        out = []
        ask = lambda text: out.append(c.post("/v1/chat/completions", json={  # noqa: E731
            "model": "specialized", "messages": [{"role": "user", "content": text}]}))
        first = threading.Thread(target=ask, args=("A slow question?",))
        first.start()
        assert slow.entered.wait(30)
        waiting = threading.Thread(target=ask, args=("Another, waiting for the models?",))
        waiting.start()
        for _ in range(200):                                   # the second one has arrived and waits
            if m.ctl.in_flight == 2:
                break
            time.sleep(0.01)
        assert m.ctl.in_flight == 2
        clock.t += 100                                         # far past rest_after_s and dream_after_s
        assert anyio.run(m.tick) == [] and m.ctl.state is State.WAKE
        assert m.proc is None and all(b.loaded for b in dr.backends.values()) and m.ctl.idle_s() == 0.0
        slow.gated = False
        slow.release.set()
        first.join(30)
        waiting.join(30)
        assert [r.status_code for r in out] == [200, 200] and m.ctl.in_flight == 0
        ended = clock.t
        clock.t += 9                                           # 109 s after it began, 9 after it ended
        assert anyio.run(m.tick) == [] and m.ctl.state is State.WAKE and m.ctl.idle_s() == 9
        clock.t += 2
        assert [a.kind for a in anyio.run(m.tick)] == ["unload"] and m.ctl.state is State.REST
        assert m.ctl.history[-1].signals["idle_s"] == clock.t - ended
    finally:
        m.stop()


def test_a_request_arriving_after_the_decision_cancels_the_unload_and_the_cycle(tmp_path):
    c, dr, m, clock = make(tmp_path)
    try:
        c.post("/v1/chat/completions", json={"model": "specialized", "messages": Q})
        clock.t += 25
        acts = m.ctl.tick(5)                                   # the decision: rest, unload, dream
        assert [a.kind for a in acts] == ["unload", "dream"] and m.ctl.state is State.DREAM
        m.ctl.begin_request()                                  # ... and a request arrives before acting
        m._unload(acts[0].tiers)
        m._start_dream()
        assert all(b.loaded for b in dr.backends.values()) and m.unloads == 0
        assert m.proc is None and not m.ctl.dreaming and m.ctl.state is State.WAKE
        assert m.ctl.history[-1].reason == "a request arrived before the DREAM cycle started"
        m.ctl.end_request()
    finally:
        m.stop()
