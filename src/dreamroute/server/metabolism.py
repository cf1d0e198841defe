"""The server's metabolism: acts on the metabolic controller's decisions while the app runs.

The controller (:mod:`dreamroute.signals.metabolic`) decides; this module does, for one app:

* every ``tick_s`` it measures the DREAM backlog (witnessed successes of the teacher tier
  since the student's last cycle) and calls ``controller.tick``;
* ``unload``: frees the named tiers' models (``backend.close()``), each holding its tier's gate
  exclusively (taken only if the tier is idle at that moment, so no call is cut and none starts
  meanwhile); the next request that needs one loads it again (``LlamaBackend`` loads lazily). A
  request that arrived meanwhile (the app counts requests in flight from their arrival) cancels
  it: no tier is unloaded while a request runs or waits, nor after it woke the hierarchy;
* ``dream``: starts ``dreamroute dream --student S --teacher T`` in a separate process, on the
  same store and an effective-settings YAML, at a lower CPU priority (``nice``), so requests
  go on being answered (it is not started when a request arrived since the tick decided); the cycle is resumable, so a server stopped mid-cycle resumes it
  the next time it dreams. When the process ends, its CPU time is charged as background
  ATP (the student tier's watts × CPU seconds, :meth:`TierCost.joules_from_seconds`) and,
  if it promoted a version, the server serves it (``DreamRoute.refresh_versions``, which waits
  until no request is in flight and holds new ones off while it swaps the memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import yaml

from ..dream.select import SUCCESS_WITNESSES
from ..signals.metabolic import Action, MetabolicController, State


class Metabolism:
    """Runs a :class:`MetabolicController` for one app.

    Args:
        st: the app's ``ServerState`` (DreamRoute, settings, requests in flight).
        controller: the controller (its ``tiers`` those of the hierarchy).
        tick_s: seconds between ticks.
        student / teacher: the DREAM pair (default: the two top tiers); no DREAM with one tier.
    """

    def __init__(self, st, controller: MetabolicController, *, tick_s: float = 5.0,
                 student: str | None = None, teacher: str | None = None):
        tiers = st.dr.settings.tier_names
        self.st, self.ctl, self.tick_s = st, controller, tick_s
        self.student = student or (tiers[-2] if len(tiers) >= 2 else None)
        self.teacher = teacher or (tiers[-1] if len(tiers) >= 2 else None)
        self.proc: subprocess.Popen | None = None
        self.dream_log: Path | None = None
        self.dream_started = 0.0
        self.cycles_started = 0
        self.unloads = 0
        st.dr.engine.metabolic = controller

    # ------------------------------------------------------------------ signals
    def backlog(self) -> int:
        """Witnessed teacher successes stored since the student's last DREAM cycle began."""
        if self.teacher is None:
            return 0
        store = self.st.dr.store
        last = store.cycles(student=self.student)
        since = last[0]["created_at"] if last else None
        return store.count_successes(self.teacher, SUCCESS_WITNESSES, since=since)

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        """Tick forever (the app's lifespan starts and cancels it)."""
        while True:
            await anyio.sleep(self.tick_s)
            await self.tick()

    async def tick(self) -> list[Action]:
        """One tick: reap a finished cycle, measure the backlog, act on the controller's actions."""
        actions = list(self._reap())
        backlog = await anyio.to_thread.run_sync(self.backlog)
        actions += self.ctl.tick(backlog)
        for a in actions:
            if a.kind == "unload":
                await anyio.to_thread.run_sync(self._unload, a.tiers)
            elif a.kind == "dream":
                self._start_dream()
            elif a.kind == "reload":
                await anyio.to_thread.run_sync(self.st.dr.refresh_versions)
        return actions

    def _unload(self, tiers: tuple[str, ...]) -> None:
        if self.ctl.in_flight or self.ctl.state not in (State.REST, State.DREAM):
            self.ctl.unloaded = ()   # a request came between the decision and now
            return
        gates = self.st.dr.engine.gates
        for t in tiers:
            b = self.st.dr.backends[t]
            with gates[t].exclusive(timeout=0) as held:   # never frees a model mid-call
                if held and getattr(b, "loaded", True):
                    b.close()
                    self.unloads += 1

    # ------------------------------------------------------------------ DREAM process
    def dream_command(self, settings_file: Path, report: Path) -> list[str]:
        """The command line of one cycle (``dreamroute dream ...`` with this interpreter)."""
        return [sys.executable, "-c", "from dreamroute.cli import app; app()", "dream", "--student", self.student, "--teacher",
                self.teacher, "--config", str(settings_file), "--db", str(self.st.dr.store.path),
                "--json", str(report)]

    def _start_dream(self) -> None:
        if self.ctl.in_flight or self.ctl.state is not State.DREAM:
            self.ctl.cancel_dream("a request arrived before the DREAM cycle started")
            return
        if self.student is None or self.proc is not None:
            self.ctl.dream_finished(False)
            return
        settings = self.st.dr.settings
        root = settings.data_dir / "dream"
        root.mkdir(parents=True, exist_ok=True)
        cfg = root / "serve-settings.yaml"
        data = settings.model_dump(mode="json", exclude_none=True, exclude={"db"})
        cfg.write_text(yaml.safe_dump(data))
        self.dream_log = root / f"serve-dream-{int(time.time())}.log"
        log = open(self.dream_log, "ab")
        env = {**os.environ, "DREAMROUTE_THREADS": os.environ.get("DREAMROUTE_THREADS", "1")}
        self.proc = subprocess.Popen(self.dream_command(cfg, self.dream_log.with_suffix(".json")), stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=lambda: os.nice(10))
        log.close()
        self.dream_started = time.time()
        self.cycles_started += 1

    def _reap(self) -> list[Action]:
        """Collect a finished cycle process: charge its CPU time, tell the controller."""
        if self.proc is None:
            return []
        try:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, usage = self.proc.pid, 0, None
        if pid == 0:
            return []
        self.proc = None
        cpu_s = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
        dr = self.st.dr
        atp = dr.memory.costs[self.student].joules_from_seconds(cpu_s)
        dr.store.record_background("dream", self.student, 0, atp, time.time() - self.dream_started)
        self.ctl.on_background(atp)
        cycles = dr.store.cycles(student=self.student)
        promoted = bool(cycles) and cycles[0]["status"] == "promoted" \
            and dr.memory.versions.get(self.student) != cycles[0]["version_id"]
        return self.ctl.dream_finished(promoted)

    def stop(self) -> None:
        """Stop a running cycle (it resumes at the next DREAM) and detach from the engine."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        self.st.dr.engine.metabolic = None

    def snapshot(self) -> dict:
        """The controller's snapshot plus what this runner did."""
        snap = self.ctl.snapshot()
        snap["dream"] = {"student": self.student, "teacher": self.teacher, "running": self.proc is not None,
                         "cycles_started": self.cycles_started, "log": str(self.dream_log) if self.dream_log else None}
        snap["unloads"] = self.unloads
        snap["loaded"] = {t: bool(getattr(b, "loaded", True)) for t, b in self.st.dr.backends.items()}
        return snap
