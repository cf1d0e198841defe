"""Metabolic states drive the server: CRISIS forces the top tier, FOCUS lowers λ and raises the
quality target for salient requests, REST unloads the bigger tiers (a request reloads them), DREAM
runs a cycle in a separate process without blocking requests."""

from __future__ import annotations

import sqlite3
import time

import anyio
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dreamroute import DreamRoute
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import MetabolicConfig
from dreamroute.signals.metabolic import MetabolicController, State
from dreamroute.server import create_app

from .conftest import TIERS, scripted_settings

Q = [{"role": "user", "content": "Is 91 a prime number? Answer yes or no."}]


class Clock:
    def __init__(self):
        self.t = time.time()

    def __call__(self):
        return self.t


class Loadable(ScriptedBackend):
    """A scripted backend that, like LlamaBackend, frees its model on close and loads it on use."""

    def __init__(self, identity):
        super().__init__(identity, lambda m: "no, 91 is 7 times 13.")
        self.loaded, self.loads = True, 0

    def close(self):
        self.loaded = False

    def generate(self, messages, **kw):
        if not self.loaded:
            self.loaded, self.loads = True, self.loads + 1
        return super().generate(messages, **kw)


def make(tmp_path, **cfg):
    clock = Clock()
    settings = scripted_settings(tmp_path)
    mc = MetabolicConfig(**{"rest_after_s": 10, "dream_after_s": 20, "dream_min_backlog": 1, **cfg})
    settings = settings.model_copy(update={"metabolic": mc})
    backends = {n: Loadable(f"sha-{n}") for n in TIERS}
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=backends, budget=1.0, cooldown_s=60.0)
    ctl = MetabolicController(mc, TIERS, clock=clock)
    app = create_app(settings, dr=dr, metabolic=ctl)
    return TestClient(app), dr, app.state.dreamroute.metabolism, clock


def test_crisis_flag_sends_routed_requests_to_the_top_tier(tmp_path):
    c, dr, m, clock = make(tmp_path)
    calm = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": Q}).json()["dreamroute"]
    assert calm["metabolic_state"] == "WAKE"
    r = c.post("/v1/metabolic", json={"crisis": True})
    assert r.status_code == 200 and r.json()["state"] == "CRISIS"
    for i in range(3):
        d = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": [
            {"role": "user", "content": f"Urgent question {i}?"}]}).json()["dreamroute"]
        assert d["tier"] == "specialized" and d["metabolic_state"] == "CRISIS"
    assert c.post("/v1/metabolic", json={"crisis": "maybe"}).status_code == 400
    assert c.post("/v1/metabolic", json={"crisis": False}).json()["state"] == "WAKE"
    hist = c.get("/v1/trust").json()["metabolic"]["history"]
    assert [h["target"] for h in hist] == ["CRISIS", "WAKE"] and hist[0]["reason"] == "crisis flag set"
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    states = {s.labels["state"]: s.value for s in fams["dreamroute_metabolic_state"].samples}
    assert states["WAKE"] == 1.0 and states["CRISIS"] == 0.0


def test_a_crisis_priority_request_goes_to_the_top_tier(tmp_path):
    c, dr, m, clock = make(tmp_path)
    d = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": Q},
               headers={"x-dreamroute-priority": "0.99"}).json()["dreamroute"]
    assert d["tier"] == "specialized" and d["metabolic_state"] == "CRISIS"


def test_focus_lowers_lambda_and_raises_the_target_for_salient_requests(tmp_path):
    c, dr, m, clock = make(tmp_path, focus_window=5, focus_enter=0.3, focus_exit=0.2, focus_lambda_scale=0.25,
                           focus_quality_target=0.7)
    seen = []
    route = dr.engine.policy.route

    def spy(request, view):
        seen.append((view.lam_scale, view.quality_floor))
        return route(request, view)
    dr.engine.policy.route = spy
    for i in range(6):
        d = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": [
            {"role": "user", "content": f"A new question number {i} about prime numbers?"}]},
            headers={"x-dreamroute-priority": "0.9"}).json()["dreamroute"]
    assert m.ctl.state is State.FOCUS and d["metabolic_state"] == "FOCUS"
    assert seen[0] == (1.0, None) and seen[-1] == (0.25, 0.7)


def test_rest_unloads_bigger_tiers_and_a_request_reloads_them(tmp_path):
    c, dr, m, clock = make(tmp_path, keep_loaded=1)
    c.post("/v1/chat/completions", json={"model": "specialized", "messages": Q})
    clock.t += 11
    actions = anyio.run(m.tick)
    assert [a.kind for a in actions] == ["unload"] and m.ctl.state is State.REST
    assert [dr.backends[t].loaded for t in TIERS] == [True, False, False]
    snap = c.get("/v1/metabolic").json()
    assert snap["loaded"] == {"sensory": True, "tactical": False, "specialized": False} and snap["unloads"] == 2
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert {s.labels["tier"]: s.value for s in fams["dreamroute_tier_loaded"].samples}["specialized"] == 0.0
    d = c.post("/v1/chat/completions", json={"model": "specialized", "messages": [
        {"role": "user", "content": "And 97?"}]}).json()["dreamroute"]
    assert d["tier"] == "specialized" and dr.backends["specialized"].loads == 1 and m.ctl.state is State.WAKE


def test_dream_runs_in_another_process_and_requests_go_on(tmp_path):
    c, dr, m, clock = make(tmp_path)
    # one witnessed teacher success is the backlog
    rid = c.post("/v1/chat/completions", json={"model": "specialized", "messages": Q}).json()["dreamroute"]["request_id"]
    assert c.post("/v1/feedback", json={"id": rid, "outcome": "success"}).status_code == 200
    clock.t += 21
    assert [a.kind for a in anyio.run(m.tick)] == ["unload", "dream"]
    assert m.ctl.state is State.DREAM and m.proc is not None
    cmd = m.dream_command(tmp_path / "x.yaml", tmp_path / "r.json")
    assert cmd[3:8] == ["dream", "--student", "tactical", "--teacher", "specialized"]
    # a request while the cycle process runs is answered, and wakes the hierarchy
    r = c.post("/v1/chat/completions", json={"model": "dreamroute", "messages": [
        {"role": "user", "content": "Meanwhile: is 2 prime?"}]})
    assert r.status_code == 200 and m.ctl.state is State.WAKE and m.ctl.dreaming
    # the cycle process ends: here it refuses the scripted tiers it was handed (they exist only in
    # this process), so it stops before putting a cycle on record
    for _ in range(600):
        anyio.run(m.tick)
        if m.proc is None:
            break
        time.sleep(0.2)
    assert m.proc is None and not m.ctl.dreaming and m.cycles_started == 1
    assert "tier 'tactical' has backend 'scripted'" in m.dream_log.read_text()
    assert dr.store.count_experiences() == 2 and dr.store.verify_ledger().ok and dr.store.cycles() == []
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("SELECT COUNT(*) FROM background_work WHERE kind = 'dream'").fetchone()[0] == 1
    assert [h["target"] for h in m.ctl.snapshot()["history"]][-1] == "WAKE"
