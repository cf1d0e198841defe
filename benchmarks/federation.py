"""Routers that learn from each other: two `dreamroute serve` processes, each in its own network
namespace as its own host, sharing one PostgreSQL store and one remote tier (issue 13 §4).

    .venv/bin/python benchmarks/federation.py --routers 2 --requests 400 --json benchmarks/results/federation.json
    .venv/bin/python benchmarks/federation.py --db postgresql+psycopg://USER:PW@127.0.0.1:5432/DB \\
        --routers 2 --requests 400 --json out.json

Needs root for the namespaces (``--isolation auto``, the default, falls back to loopback where
``ip netns`` / veth links are not permitted; the JSON says which was used).

The machines, on one box:

* a private link: a bridge ``<tag>br`` with ``10.77.0.1/24`` in the root namespace, and per
  router a network namespace ``<tag>-rK`` joined to it by a veth pair, the router's end holding
  ``10.77.0.1K`` (``--subnet`` changes ``10.77.0``). The root namespace is the "server room":
  PostgreSQL and the remote tier listen on ``10.77.0.1``, and the clients (this process) reach
  each router at its own address. Each router sees the others only through the database.
* the remote tier: ``benchmarks/fake_upstream.py`` (OpenAI-compatible, ``--latency-ms`` per
  answer, answers "The answer is N." with N the first integer of the last user message), behind
  two tiers ``small`` / ``large`` of every router (the same ``base_url``, so both routers serve
  the same model versions: a tier's identity is ``base_url#model``).
* PostgreSQL: without ``--db``, a cluster of its own from ``scripts/pg_test_cluster.sh`` (in
  ``/tmp/dreamroute-pg-federation-PID``, listening on 127.0.0.1 and ``10.77.0.1``, pg_hba open
  to the link: ``DREAMROUTE_PG_LISTEN`` / ``DREAMROUTE_PG_HBA``), stopped at the end. With
  ``--db URL`` that server is used (the user needs CREATEDB); when its host is loopback, the
  routers reach it through a TCP relay on ``10.77.0.1`` (a process of this script). Each phase
  gets a fresh database on that server (``<db>_fed_<phase>_<pid>``, dropped at the end unless
  ``--keep-dbs``).
* each router: ``dreamroute serve --config R.yaml --db URL --host ITS_IP``, the reality cache
  off, forgetting off (``router.forgetting: 1.0``: trust is then a plain count, so the store's
  α/β can be checked against the outcomes the clients sent), ``store.instance_id`` ``<phase>-K``
  (its ledger chain), ``store.sync`` on (the default for PostgreSQL, every 1 s).

The workload: ``--requests`` N generated questions "Is it S? Work out A + B ..." (seeded). The
upstream answers S, so a question is answered right exactly when S = A + B: the generator
makes a third of them ask ``large`` (right 85 % of the time) and two thirds ``small`` (60 %),
each pinned (``model: small|large``, so which version answers each question is the same in
every phase; ``--routed`` sends ``model: dreamroute`` instead). Question i goes to router
i mod R, from ``--clients`` concurrent clients per router; each answer is graded by the client
and its verdict sent (``POST /v1/feedback``), to the router that answered or, for every
``--cross-feedback`` share of them, to another router (the user told the other box).

Phases:

1. ``two``: N requests split between the R routers (fresh database). Then ``sync_lag``:
   ``--probes`` times, a new question answered by router A and judged a success there, and
   router B's ``/metrics`` ``dreamroute_fast_path_entries`` polled every 20 ms: it grows when B's
   sync poll has added A's experience to B's memory (its fast-path cache is filled from the
   absorbed row); then the same question sent to B must be a fast-path hit (answered from A's
   experience, no upstream call). A probe whose experience B's poll read between its storing
   and its verdict has no fast-path entry (the verdict is not synced onto a row B already
   holds): counted as not observed. ``--late-probes`` more give their verdict 2 s after the
   answer (as a user would): whether such a verdict ever reaches B's memory. Beside the R
   routers an observer (a DreamRoute in this process on the same database, serving nothing,
   syncing as `serve` does) is read directly after the workload: the experiences its memory
   holds, how many of the judged ones it holds with their verdict, its trust against the
   store's rows, its fast-path entries.
2. ``one``: the same N through one router (fresh database, the same total clients).
3. ``kill``: the N again through R routers (fresh database); once ``--kill-at`` of them are
   answered, the last router is SIGKILLed. Its clients' requests fail over to a live router
   (a chat that got no answer is sent again there; a verdict that got no answer is sent there,
   where 409 ``feedback_exists`` means the dead router had recorded it).

After each phase the routers are stopped (SIGTERM, except the killed one) and the store checked
in this process:

* ``lost_updates``: per model version × context, the store's α − 1 (successes) and β − 1
  (failures) against the verdicts the clients had confirmed (feedback answered 200, or 409:
  already on record); the sum of |differences| over cells (a missing or double-counted update
  each count 1), and the trust rows' count against the same.
* ``ledgers_ok``: ``Store.verify_ledger`` (every chain, each trust row's entries across chains)
  and ``dreamroute ledger verify --db URL`` (its exit status).
* ``trust_max_abs_diff`` (``two`` vs ``one``): max |posterior mean difference| per version
  (α, β summed over contexts) and per version × context (cells both have; the context a
  request lands in depends on each router's memory, so cells differ).
* ``lost_answered``: chats answered 200 whose request id is not on record; ``lost_verdicts``:
  confirmed verdicts the store does not hold on that experience.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from loopback import free_port, pct, wait_http   # noqa: E402 (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DREAMROUTE = str(Path(PY).with_name("dreamroute"))
sys.path.insert(0, str(ROOT / "src"))

ANSWER = re.compile(r"answer is\s*(-?\d+)", re.I)
FAST_ENTRIES = re.compile(r"^dreamroute_fast_path_entries\s+(\S+)$", re.M)


# ---- cleanup that runs however the run ends -------------------------------------------------
class Cleanup:
    """Undo steps, run last-in first-out once: from ``finally``, ``atexit`` and SIGTERM/SIGINT."""

    def __init__(self):
        self.steps: list[tuple[str, object]] = []
        atexit.register(self.run)

    def add(self, name: str, fn) -> None:
        self.steps.append((name, fn))

    def run(self) -> None:
        while self.steps:
            name, fn = self.steps.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - go on undoing the rest
                print(f"cleanup {name}: {e}", file=sys.stderr)


CLEANUP = Cleanup()


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)   # unwinds through every finally, then atexit


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


# ---- the private link -----------------------------------------------------------------------
class Net:
    """The hosts: ``hub`` (root namespace: PostgreSQL, the upstream, the clients) and one address
    per router, each in its own network namespace on a bridge (``netns``), or all on loopback."""

    def __init__(self, routers: int, subnet: str, mode: str):
        self.n, self.subnet = routers, subnet
        self.tag = f"drf{os.getpid() % 100000}"
        self.isolation = "loopback"
        self.hub = "127.0.0.1"
        self.hosts = ["127.0.0.1"] * routers
        self.namespaces: list[str | None] = [None] * routers
        self.why_loopback: str | None = None
        if mode == "loopback":
            self.why_loopback = "--isolation loopback"
            return
        try:
            self._netns()
            self._check()
            self.isolation = "netns"
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:
            why = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
            self.teardown()
            if mode == "netns":
                raise RuntimeError(f"network namespaces unavailable: {why}") from e
            self.why_loopback = f"network namespaces unavailable: {why}"
            self.hub, self.hosts, self.namespaces = "127.0.0.1", ["127.0.0.1"] * routers, [None] * routers
            print(f"federation: {self.why_loopback}; routers on loopback", file=sys.stderr)

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    def _netns(self) -> None:
        CLEANUP.add("network", self.teardown)
        br = f"{self.tag}br"
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", br)
        sh("ip", "link", "set", br, "up")
        self.hub = f"{self.subnet}.1"
        for k in range(self.n):
            ns, v, p = f"{self.tag}-r{k}", f"{self.tag}v{k}", f"{self.tag}p{k}"
            ip = f"{self.subnet}.{11 + k}"
            sh("ip", "netns", "add", ns)
            self.namespaces[k] = ns
            sh("ip", "link", "add", v, "type", "veth", "peer", "name", p)
            sh("ip", "link", "set", p, "netns", ns)
            sh("ip", "link", "set", v, "master", br, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", p)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", p, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.hosts[k] = ip

    def _check(self) -> None:
        """Each namespace reaches the hub over the link, and the hub reaches each router's address."""
        with socket.socket() as srv:
            srv.bind((self.hub, 0))
            srv.listen(8)
            port = srv.getsockname()[1]
            for k, ns in enumerate(self.namespaces):
                code = (f"import socket; s = socket.create_connection(('{self.hub}', {port}), timeout=3); "
                        f"s.close()")
                r = sh("ip", "netns", "exec", ns, PY, "-c", code, check=False)
                if r.returncode != 0:
                    raise RuntimeError(f"namespace {ns} cannot reach {self.hub}: {r.stderr.strip()[-300:]}")
                srv.accept()[0].close()

    def prefix(self, k: int) -> list[str]:
        ns = self.namespaces[k]
        return ["ip", "netns", "exec", ns] if ns else []

    def teardown(self) -> None:
        for ns in self.namespaces:
            if ns:
                sh("ip", "netns", "del", ns, check=False)   # takes the veth pair with it
        for k in range(self.n):
            sh("ip", "link", "del", f"{self.tag}v{k}", check=False)
        sh("ip", "link", "del", f"{self.tag}br", check=False)
        self.namespaces = [None] * self.n

    def leftovers(self) -> list[str]:
        """Namespaces and links of this run still present (after teardown: none)."""
        ns = sh("ip", "netns", "list", check=False).stdout
        links = sh("ip", "-o", "link", "show", check=False).stdout
        return sorted({w.split("@")[0].rstrip(":") for w in (ns + links).split() if w.startswith(self.tag)})


# ---- PostgreSQL -----------------------------------------------------------------------------
class Postgres:
    """The server: our own cluster (``scripts/pg_test_cluster.sh``) or the ``--db`` one, fresh
    databases on it, and the URL each side uses (the routers' through the link)."""

    def __init__(self, db: str | None, net: Net):
        from sqlalchemy.engine import make_url
        self.own = db is None
        self.relay: subprocess.Popen | None = None
        if self.own:
            self.dir = f"/tmp/dreamroute-pg-federation-{os.getpid()}"
            env = {**os.environ, "DREAMROUTE_PG_DIR": self.dir}
            if net.isolation == "netns":
                env |= {"DREAMROUTE_PG_LISTEN": net.hub, "DREAMROUTE_PG_HBA": net.cidr}
            CLEANUP.add("postgres", self.stop)
            out = subprocess.run(["bash", str(ROOT / "scripts/pg_test_cluster.sh"), "start"], env=env,
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"pg_test_cluster.sh start failed: {out.stderr.strip()[-800:]}")
            db = out.stdout.strip().rpartition("DREAMROUTE_TEST_PG_URL=")[2]
        self.url = make_url(db)     # what this process uses (and the relay's target)
        self.route_host, self.route_port = self.url.host, self.url.port or 5432
        if net.isolation == "netns":
            if self.own:
                self.route_host = net.hub
            elif self._loopback(self.url.host):
                self.route_port = free_port(net.hub)
                self.relay = subprocess.Popen([PY, __file__, "_relay", net.hub, str(self.route_port),
                                               self.url.host, str(self.url.port or 5432)])
                CLEANUP.add("relay", self._stop_relay)
                self.route_host = net.hub
        self.created: list[str] = []

    @staticmethod
    def _loopback(host: str | None) -> bool:
        try:
            return host in (None, "", "localhost") or ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _admin(self):
        import psycopg
        u = self.url.set(drivername="postgresql", database="postgres")
        return psycopg.connect(u.render_as_string(hide_password=False), autocommit=True)

    def fresh(self, phase: str) -> tuple[str, str]:
        """A new database: (URL for this process, URL for the routers)."""
        name = f"{self.url.database or 'dreamroute'}_fed_{phase}_{os.getpid()}"
        with self._admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        here = self.url.set(database=name)
        there = here.set(host=self.route_host, port=self.route_port)
        return here.render_as_string(hide_password=False), there.render_as_string(hide_password=False)

    def drop_created(self) -> None:
        with self._admin() as c:
            for name in self.created:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created = []

    def _stop_relay(self) -> None:
        if self.relay is not None and self.relay.poll() is None:
            self.relay.terminate()
            self.relay.wait(10)

    def stop(self) -> None:
        env = {**os.environ, "DREAMROUTE_PG_DIR": self.dir}
        subprocess.run(["bash", str(ROOT / "scripts/pg_test_cluster.sh"), "stop"], env=env, check=False)


def relay_main(listen_host: str, listen_port: int, host: str, port: int) -> None:
    """A TCP relay (``federation.py _relay``): routers in their namespaces reach a loopback server."""
    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def handle(r, w):
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    async def main():
        server = await asyncio.start_server(handle, listen_host, listen_port)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# ---- the routers ----------------------------------------------------------------------------
def write_config(path: Path, data_dir: Path, upstream: str, instance_id: str, max_in_flight: int) -> None:
    tiers = [{"name": name, "model": f"remote {name}", "backend": "openai", "base_url": upstream,
              "remote_model": "fake", "params_b": p, "timeout_s": 60.0, "logprobs": False,
              "max_in_flight": max_in_flight, "max_queue": 4096} for name, p in (("small", 0.5), ("large", 1.5))]
    cfg = {"tiers": tiers, "data_dir": str(data_dir), "cache": {"enabled": False},
           "router": {"forgetting": 1.0},
           "store": {"instance_id": instance_id, "sync_interval_s": 1.0},
           "server": {"request_timeout_s": 600.0}}
    path.write_text(yaml.safe_dump(cfg))


class Router:
    def __init__(self, k: int, net: Net, work: Path, phase: str, upstream: str, max_in_flight: int):
        self.k, self.net = k, net
        self.name = f"{phase}-{chr(ord('a') + k)}"
        self.host = net.hosts[k]
        self.port = 8000 if net.isolation == "netns" else free_port()
        self.base = f"http://{self.host}:{self.port}"
        d = work / self.name
        d.mkdir(parents=True, exist_ok=True)
        self.cfg = d / "router.yaml"
        write_config(self.cfg, d / "data", upstream, self.name, max_in_flight)
        self.log = open(d / "serve.log", "w")
        self.proc: subprocess.Popen | None = None
        self.killed_at: float | None = None

    def start(self, db_url: str) -> None:
        cmd = self.net.prefix(self.k) + [DREAMROUTE, "serve", "--config", str(self.cfg), "--db", db_url,
                                         "--host", self.host, "--port", str(self.port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        CLEANUP.add(f"router {self.name}", self.stop)

    def wait(self) -> None:
        wait_http(self.base + "/health", self.proc)
        import psutil   # `ip netns exec` execs the command: the pid is the server's own
        cmd = " ".join(psutil.Process(self.proc.pid).cmdline())
        if "serve" not in cmd:
            raise RuntimeError(f"router {self.name}: pid {self.proc.pid} is {cmd!r}, not the server")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.killed_at is None

    def kill(self) -> None:
        self.killed_at = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def start_routers(n: int, net: Net, work: Path, phase: str, upstream: str, db_router: str,
                  max_in_flight: int) -> tuple[list[Router], float]:
    """Start ``n`` routers at once (they migrate the fresh database together); seconds until all answer."""
    t0 = time.monotonic()
    routers = [Router(k, net, work, phase, upstream, max_in_flight) for k in range(n)]
    for r in routers:
        r.start(db_router)
    for r in routers:
        r.wait()
    return routers, time.monotonic() - t0


# ---- the workload ---------------------------------------------------------------------------
def questions(n: int, seed: int, routed: bool) -> list[dict]:
    """``n`` graded questions; the upstream answers the first integer S of "Is it S? Work out A + B",
    so a question is answered right exactly when S = A + B. Pinned: a third go to ``large`` (right
    85 %), the rest to ``small`` (60 %); routed: every one to ``dreamroute`` (right 70 %)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        model = "dreamroute" if routed else ("large" if i % 3 == 0 else "small")
        p_right = {"large": 0.85, "small": 0.6, "dreamroute": 0.7}[model]
        a, b = rng.randint(2, 499), rng.randint(2, 499)
        right = rng.random() < p_right
        shown = a + b if right else a + b + rng.choice([-10, -1, 1, 10])
        out.append({"i": i, "model": model, "a": a, "b": b, "shown": shown, "gold": a + b, "right": right})
    return out


def prompt_of(q: dict, phase: str) -> str:
    return f"[req:{phase}-{q['i']}] Is it {q['shown']}? Work out {q['a']} + {q['b']} and end with: The answer is N."


class Phase:
    """Clients of one phase: ``clients`` per router, question i to router i mod R, each answer
    graded and its verdict sent; optional SIGKILL of the last router after ``kill_after`` answers."""

    def __init__(self, name: str, routers: list[Router], qs: list[dict], clients: int, cross: float,
                 kill_after: int | None = None, max_tokens: int = 16):
        self.name, self.routers, self.qs = name, routers, qs
        self.clients, self.cross, self.kill_after, self.max_tokens = clients, cross, kill_after, max_tokens
        self.records: list[dict] = []
        self.answered = 0
        self.t_kill: float | None = None
        self.victim = routers[-1] if kill_after is not None else None

    def live(self, prefer: int) -> Router | None:
        r = self.routers[prefer]
        if r.alive:
            return r
        return next((x for x in self.routers if x.alive), None)

    async def run(self) -> float:
        limits = httpx.Limits(max_connections=4 * self.clients, max_keepalive_connections=4 * self.clients)
        self.http = {r.k: httpx.AsyncClient(base_url=r.base, timeout=120, limits=limits) for r in self.routers}
        queues = [[q for q in self.qs if q["i"] % len(self.routers) == k] for k in range(len(self.routers))]
        for q in queues:
            q.reverse()
        t0 = time.monotonic()
        try:
            async def client(k):
                while queues[k]:
                    await self.one(queues[k].pop(), k)
            await asyncio.gather(*(client(k) for k in range(len(self.routers)) for _ in range(self.clients)))
        finally:
            for c in self.http.values():
                await c.aclose()
        return time.monotonic() - t0

    def _maybe_kill(self) -> None:
        if self.victim is not None and self.t_kill is None and self.answered >= self.kill_after:
            self.victim.kill()
            self.t_kill = time.monotonic()
            print(f"  SIGKILL {self.victim.name} (pid {self.victim.proc.pid}) after {self.answered} answers",
                  flush=True)

    async def one(self, q: dict, k: int) -> None:
        n = len(self.routers)
        rec = {"i": q["i"], "model": q["model"], "router": self.routers[k].name, "attempts": [], "rid": None}
        self.records.append(rec)
        body = {"model": q["model"], "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": prompt_of(q, self.name)}]}
        target = self.routers[k]
        while target is not None and rec["rid"] is None:        # the chat, failing over to a live router
            t = time.monotonic()
            att = {"router": target.name, "t_send": t, "kill_before_send": self.t_kill is not None}
            rec["attempts"].append(att)
            try:
                r = await self.http[target.k].post("/v1/chat/completions", json=body)
                att["status"] = r.status_code
                att["t_done"] = time.monotonic()
                if r.status_code == 200:
                    js = r.json()
                    info = js["dreamroute"]
                    text = js["choices"][0]["message"]["content"]
                    m = ANSWER.search(text)
                    rec.update(rid=info["request_id"], answered_by=target.name, tier=info["tier"],
                               context=info["context"], fast_path=bool(info.get("fast_path")),
                               correct=m is not None and int(m.group(1)) == q["gold"])
                    self.answered += 1
                    self._maybe_kill()
                else:
                    att["error"] = r.text[:200]
                    break
            except httpx.HTTPError as e:
                att["error"] = f"{type(e).__name__}: {e}"[:200]
                att["t_done"] = time.monotonic()
                if target.alive:
                    break           # a live router failed: an error, not a fail-over
                target = self.live((k + 1) % n)
        if rec["rid"] is None:
            return
        other = n > 1 and self.cross > 0 and (q["i"] // n) % round(1 / self.cross) == 0
        by_k = next(x.k for x in self.routers if x.name == rec["answered_by"])
        fb_k = (by_k + 1) % n if other else by_k
        target = self.live(fb_k)
        rec["feedback"] = []
        fb = {"id": rec["rid"], "outcome": "success" if rec["correct"] else "failure"}
        while target is not None:                                # the verdict, failing over likewise
            att = {"router": target.name, "t_send": time.monotonic()}
            rec["feedback"].append(att)
            try:
                r = await self.http[target.k].post("/v1/feedback", json=fb)
                att["t_done"] = time.monotonic()
                att["status"] = r.status_code
                if r.status_code != 200:
                    att["error"] = r.text[:200]
                break
            except httpx.HTTPError as e:
                att["error"] = f"{type(e).__name__}: {e}"[:200]
                if target.alive:
                    break
                target = self.live((fb_k + 1) % n)
        last = rec["feedback"][-1] if rec["feedback"] else {}
        # 409 feedback_exists: this very verdict is already on record (sent to a router that died after committing)
        rec["verdict_confirmed"] = last.get("status") == 200 or (last.get("status") == 409
                                                                   and "feedback_exists" in last.get("error", ""))


# ---- checks against the store ---------------------------------------------------------------
def store_facts(url: str) -> dict:
    """Trust rows, every experience's request id / outcome / witness, and the ledger report."""
    from dreamroute.store.store import Store
    with Store(url) as store:
        trust = [dict(tier=r.tier, context=r.context, alpha=r.alpha, beta=r.beta, count=r.count)
                 for r in store.trust_table()]
        exps = store.experiences(["id", "request_id", "role", "tier", "context", "outcome", "witness",
                                  "instance_id"])
        rep = store.verify_ledger()
    return {"trust": trust, "experiences": exps,
            "ledger": {"ok": bool(rep.ok), "entries": rep.entries, "chains": dict(rep.chains),
                       "problems": rep.problems[:10]}}


def ledger_cli(url: str) -> dict:
    r = subprocess.run([DREAMROUTE, "ledger", "verify", "--db", url], capture_output=True, text=True)
    return {"rc": r.returncode, "ok": r.returncode == 0, "said": " ".join((r.stdout + r.stderr).split())[:300]}


def check(records: list[dict], facts: dict, prior: tuple[float, float] = (1.0, 1.0)) -> dict:
    """lost_updates, lost_answered, lost_verdicts of one phase (see the module docstring)."""
    want: dict[tuple[str, str], list[float]] = {}
    for rec in records:
        if rec.get("rid") and rec.get("verdict_confirmed"):
            w = want.setdefault((rec["tier"], rec["context"]), [0.0, 0.0])
            w[0 if rec["correct"] else 1] += 1
    have = {(t["tier"], t["context"]): [t["alpha"] - prior[0], t["beta"] - prior[1], t["count"]]
            for t in facts["trust"]}
    cells, lost, count_off = [], 0.0, 0.0
    for key in sorted(set(want) | set(have)):
        s, f = want.get(key, [0.0, 0.0])
        hs, hf, hn = have.get(key, [0.0, 0.0, 0.0])
        d = abs(hs - s) + abs(hf - f)
        lost += d
        count_off += abs(hn - (s + f))
        cells.append({"tier": key[0], "context": key[1], "client_success": s, "client_failure": f,
                      "store_alpha_minus_prior": hs, "store_beta_minus_prior": hf, "store_count": hn})
    by_rid: dict[str, list[dict]] = {}
    for e in facts["experiences"]:
        by_rid.setdefault(e["request_id"], []).append(e)
    answered = [r for r in records if r.get("rid")]
    lost_answered = [r["rid"] for r in answered if r["rid"] not in by_rid]
    lost_verdicts = []
    for r in answered:
        if not r.get("verdict_confirmed") or r["rid"] not in by_rid:
            continue
        row = [e for e in by_rid[r["rid"]] if e["role"] != "audit"][-1]
        if (row["outcome"], row["witness"]) != ("success" if r["correct"] else "failure", "user:api"):
            lost_verdicts.append(r["rid"])
    answered_rids = {r["rid"] for r in answered}
    stored_unanswered = sorted({e["request_id"] for e in facts["experiences"]} - answered_rids)
    return {"lost_updates": int(round(lost)), "count_mismatch": int(round(count_off)), "checked_answers": len(answered),
            "verdicts_confirmed": sum(1 for r in answered if r.get("verdict_confirmed")),
            "verdicts_unconfirmed": sum(1 for r in answered if not r.get("verdict_confirmed")),
            "lost_answered": len(lost_answered), "lost_answered_ids": lost_answered[:10],
            "lost_verdicts": len(lost_verdicts), "stored_unanswered": len(stored_unanswered),
            "experiences": len(facts["experiences"]), "cells": cells}


def trust_diff(a: list[dict], b: list[dict]) -> dict:
    """Max |posterior mean difference| per version (α, β summed over contexts) and per version × context."""
    def per_version(rows):
        out: dict[str, list[float]] = {}
        for t in rows:
            s = out.setdefault(t["tier"], [1.0, 1.0, 0.0])
            s[0] += t["alpha"] - 1.0
            s[1] += t["beta"] - 1.0
            s[2] += t["count"]
        return {k: {"alpha": v[0], "beta": v[1], "n": v[2], "mean": v[0] / (v[0] + v[1])} for k, v in out.items()}
    va, vb = per_version(a), per_version(b)
    ver = {k: {"two": va.get(k), "one": vb.get(k),
               "abs_diff": abs(va[k]["mean"] - vb[k]["mean"]) if k in va and k in vb else None}
           for k in sorted(set(va) | set(vb))}
    ca = {(t["tier"], t["context"]): t for t in a}
    cb = {(t["tier"], t["context"]): t for t in b}
    cells = []
    for key in sorted(set(ca) | set(cb)):
        x, y = ca.get(key), cb.get(key)
        mx = x["alpha"] / (x["alpha"] + x["beta"]) if x else None
        my = y["alpha"] / (y["alpha"] + y["beta"]) if y else None
        cells.append({"tier": key[0], "context": key[1], "two_mean": mx, "two_n": x["count"] if x else 0,
                      "one_mean": my, "one_n": y["count"] if y else 0,
                      "abs_diff": abs(mx - my) if x and y else None})
    both = [c["abs_diff"] for c in cells if c["abs_diff"] is not None]
    per_v = [v["abs_diff"] for v in ver.values() if v["abs_diff"] is not None]
    return {"per_version": max(per_v) if per_v else None,
            "per_version_context": max(both) if both else None,
            "cells_in_both": len(both), "cells_in_one_only": [f"{c['tier']}/{c['context']}" for c in cells
                                                               if c["abs_diff"] is None],
            "versions": ver, "cells": cells}


# ---- sync lag -------------------------------------------------------------------------------
def fast_entries(base: str) -> float:
    m = FAST_ENTRIES.search(httpx.get(base + "/metrics", timeout=10).text)
    return float(m.group(1)) if m else float("nan")


def sync_lag(routers: list[Router], probes: int, seed: int, records: list[dict], timeout_s: float = 5.0,
             late: int = 0, late_delay_s: float = 2.0) -> dict:
    """Probes A → B (alternating): a new question A answers and a success verdict there, then B's
    fast-path entries polled every 20 ms until they grow (B's memory holds A's experience), then
    the question sent to B (a fast-path hit: answered from A's experience). Appends the probes'
    answers to ``records`` (their verdicts changed trust: they are checked with the rest).

    Then ``late`` probes whose verdict is sent ``late_delay_s`` after the answer (more than a poll
    interval: as a user's would be), B watched until 3 s after the verdict: whether a verdict given
    after B's poll read the experience ever reaches B's memory (router/sync.py says it does not:
    trust rows are reread, the row's outcome in B's index and fast path stays unknown)."""
    rng = random.Random(seed)
    out = []
    with httpx.Client(timeout=60) as c:
        for j in range(probes + late):
            delay = late_delay_s if j >= probes else 0.0
            src, dst = routers[j % 2], routers[(j + 1) % 2]
            time.sleep(rng.uniform(0.0, 1.2))      # spread the probes over the poll's phase
            a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
            body = {"model": "small", "max_tokens": 16, "messages": [{"role": "user", "content":
                    f"[req:probe-{j}] Is it {a + b}? Work out {a} + {b} and end with: The answer is N."}]}
            e0 = fast_entries(dst.base)
            r = c.post(src.base + "/v1/chat/completions", json=body)
            t_stored = time.monotonic()
            rid = r.json()["dreamroute"]["request_id"]
            if delay:
                time.sleep(delay)
            fb = c.post(src.base + "/v1/feedback", json={"id": rid, "outcome": "success"})
            t_verdict = time.monotonic()
            seen = None
            while time.monotonic() - t_stored < (timeout_s if not delay else delay + 3.0):
                if fast_entries(dst.base) > e0:
                    seen = time.monotonic()
                    break
                time.sleep(0.02)
            hit = c.post(dst.base + "/v1/chat/completions", json=body)
            info = r.json()["dreamroute"]
            records.append({"i": f"probe-{j}", "rid": rid, "answered_by": src.name, "tier": info["tier"],
                            "context": info["context"], "correct": True, "attempts": [],
                            "verdict_confirmed": fb.status_code == 200})
            hinfo = hit.json()["dreamroute"]
            if not hinfo.get("fast_path"):   # answered by the upstream: stored, no verdict
                records.append({"i": f"probe-{j}-miss", "rid": hinfo["request_id"], "answered_by": dst.name,
                                "tier": hinfo["tier"], "context": hinfo["context"], "correct": True,
                                "attempts": [], "verdict_confirmed": False})
            out.append({"from": src.name, "to": dst.name, "chat": r.status_code, "feedback": fb.status_code,
                        "verdict_delay_s": delay,
                        "lag_s": seen - t_stored if seen else None,
                        "lag_after_verdict_s": seen - t_verdict if seen else None,
                        "verdict_after_s": t_verdict - t_stored,
                        "served_by_fast_path_on_dst": hit.headers.get("x-dreamroute-fast-path") == "1"})
    late_out = [p for p in out if p["verdict_delay_s"]]
    out = [p for p in out if not p["verdict_delay_s"]]
    lags = [p["lag_s"] for p in out if p["lag_s"] is not None]
    return {"late_verdict": {"probes": len(late_out), "verdict_delay_s": late_delay_s,
                             "observed_on_other_router": sum(p["lag_s"] is not None for p in late_out),
                             "fast_path_hits_on_other_router": sum(p["served_by_fast_path_on_dst"] for p in late_out),
                             "samples": late_out},"method": "router B's /metrics dreamroute_fast_path_entries, polled every 20 ms, from the moment "
                      "router A's answer (its experience committed) reached the client; then the same "
                      "question to B must be a fast-path hit",
            "probes": len(out), "observed": len(lags),
            "p50": pct(lags, 50), "p90": pct(lags, 90), "max": max(lags) if lags else None,
            "mean": statistics.fmean(lags) if lags else None,
            "fast_path_hits_on_other_router": sum(p["served_by_fast_path_on_dst"] for p in out),
            "samples": out}


# ---- a third router that only listens -------------------------------------------------------
class Observer:
    """A DreamRoute in this process on the phase's database that serves nothing and only syncs
    (``start_sync``, the code `serve` runs): what a router's memory holds of what the others
    stored, read directly (its index rows and their outcomes, its trust, its fast path)."""

    def __init__(self, work: Path, upstream: str, db_here: str, max_in_flight: int, name: str):
        from dreamroute.api import DreamRoute
        from dreamroute.config import load_settings
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        write_config(d / "router.yaml", d / "data", upstream, name, max_in_flight)
        self.dr = DreamRoute(load_settings(d / "router.yaml"), db=db_here, fast_path=True)
        self.dr.start_sync(force=True)

    def report(self, settle_s: float = 2.5) -> dict:
        import math
        time.sleep(settle_s)
        dr = self.dr
        dr.sync()
        store_rows = dr.store.experiences(["id", "role", "outcome"])
        trust_rows = dr.store.trust_table()
        with dr.engine.state:
            mem = dr.memory
            rows = dict(mem.exp_rows)
            outcome = mem.index.outcome.copy()
            trust = {k: (v.alpha, v.beta, v.count) for k, v in mem.trust.items()}
            fast = len(dr.responses) if dr.responses is not None else 0
        known = {"success", "failure"}
        held = [r for r in store_rows if r["id"] in rows]
        judged = [r for r in store_rows if r["outcome"] in known]
        missing_verdict = [r["id"] for r in held if r["outcome"] in known and math.isnan(outcome[rows[r["id"]]])]
        wrong = [r["id"] for r in held if r["outcome"] in known and not math.isnan(outcome[rows[r["id"]]])
                 and (outcome[rows[r["id"]]] >= 0.5) != (r["outcome"] == "success")]
        tdiff = 0.0
        for t in trust_rows:
            a, b, _n = trust.get((t.model_version_id, t.context), (math.nan, math.nan, math.nan))
            tdiff = max(tdiff, abs(a - t.alpha), abs(b - t.beta)) if not math.isnan(a) else math.inf
        servable = sum(1 for r in store_rows if r["outcome"] == "success" and r["role"] != "audit")
        return {"experiences_in_store": len(store_rows), "experiences_in_memory": len(held),
                "judged_in_store": len(judged), "judged_in_memory_with_their_verdict": len(held) - len(missing_verdict)
                - sum(1 for r in held if r["outcome"] not in known),
                "judged_in_store_but_unknown_in_memory": len(missing_verdict), "verdict_differs_in_memory": len(wrong),
                "trust_rows": len(trust_rows), "trust_max_abs_diff_memory_vs_store": tdiff,
                "fast_path_entries": fast, "success_answers_in_store": servable,
                "polls": self.dr._sync.polls, "absorbed": self.dr._sync.absorbed}

    def close(self) -> None:
        if self.dr is not None:
            self.dr.close()
            self.dr = None


# ---- a phase from start to check ------------------------------------------------------------
def run_phase(name: str, n_routers: int, qs: list[dict], a, net: Net, pg: Postgres, work: Path, upstream: str,
              kill_at: float | None = None, probes: int = 0) -> dict:
    print(f"phase {name}: {n_routers} router(s), {len(qs)} requests", flush=True)
    here, there = pg.fresh(name)
    load0 = os.getloadavg()
    routers, start_s = start_routers(n_routers, net, work, name, upstream, there, a.max_in_flight)
    kill_after = int(kill_at * len(qs)) if kill_at is not None else None
    observer = None
    if probes and n_routers > 1:
        observer = Observer(work, upstream, here, a.max_in_flight, f"{name}-observer")
        CLEANUP.add("observer", observer.close)
    ph = Phase(name, routers, qs, a.clients if n_routers > 1 else a.clients * a.routers,
               a.cross_feedback if n_routers > 1 else 0.0, kill_after)
    wall = asyncio.run(ph.run())
    observed = observer.report() if observer is not None else None
    if observer is not None:
        observer.close()
    snapshot = store_facts(here)       # before the probes: what the workload left
    probe_recs: list[dict] = []
    lag = sync_lag(routers, probes, a.seed + 7, probe_recs, late=a.late_probes) \
        if probes and n_routers > 1 else None
    for r in routers:
        r.stop()
    facts = store_facts(here)
    cli = ledger_cli(here)
    recs = ph.records
    answered = sum(1 for r in recs if r.get("rid"))
    victim = ph.victim.name if ph.victim is not None else None
    errors = [att for r in recs for att in r["attempts"] if att.get("status") != 200 and att["router"] != victim]
    on_killed = [att for r in recs for att in r["attempts"] if att.get("status") != 200 and att["router"] == victim]
    fb_errors = [att for r in recs for att in r.get("feedback", []) if att.get("status") != 200
                 and att["router"] != victim]
    chat_ms = [1e3 * (att["t_done"] - att["t_send"]) for r in recs for att in r["attempts"] if att.get("status") == 200]
    fb_ms = [1e3 * (att["t_done"] - att["t_send"]) for r in recs for att in r.get("feedback", [])
             if att.get("status") == 200]
    res = {"routers": [r.name for r in routers], "hosts": [r.host for r in routers], "requests": len(qs),
           "answered": answered, "errors": len(errors), "error_samples": [e.get("error") for e in errors[:3]],
           "feedback_errors": len(fb_errors), "errors_on_killed_router": len(on_killed),
           "chat_latency_p50_ms": pct(chat_ms, 50), "chat_latency_p99_ms": pct(chat_ms, 99),
           "feedback_latency_p50_ms": pct(fb_ms, 50), "feedback_latency_p99_ms": pct(fb_ms, 99),
           "wall_s": wall, "answered_per_s": answered / wall if wall else None, "router_start_s": start_s,
           "load_average_before": load0[0], "load_average_after": os.getloadavg()[0],
           "answered_by": {r.name: sum(1 for x in recs if x.get("answered_by") == r.name) for r in routers},
           "feedback_via_other_router": sum(1 for x in recs if x.get("feedback")
                                            and x["feedback"][-1]["router"] != x.get("answered_by")),
           "fast_path_answers": sum(1 for x in recs if x.get("fast_path")),
           "ledger": facts["ledger"], "ledger_cli": cli,
           "ledger_ok": facts["ledger"]["ok"] and cli["ok"]}
    res.update(check(recs + probe_recs, facts))
    res["probe_requests"] = len(probe_recs)
    if observed is not None:
        res["observer"] = observed
    res["_snapshot_trust"] = snapshot["trust"]
    if lag is not None:
        res["sync_lag"] = lag
    if ph.victim is not None:
        t_kill = ph.t_kill if ph.t_kill is not None else float("inf")
        vname = ph.victim.name
        t_first = min(r["attempts"][0]["t_send"] for r in recs)
        # every call a live router got from the kill on (a request's own, a fail-over, a verdict), and
        # those it was already serving when the other one died
        chats = [att for r in recs for att in r["attempts"] if att["router"] != vname]
        verdicts = [att for r in recs for att in r.get("feedback", []) if att["router"] != vname]
        chat_after = [x for x in chats if x["t_send"] >= t_kill]
        chat_during = [x for x in chats if x["t_send"] < t_kill <= x.get("t_done", 0)]
        fb_after = [x for x in verdicts if x.get("t_done", x["t_send"]) >= t_kill]
        ok_fb = lambda x: x.get("status") == 200 or (x.get("status") == 409 and "feedback_exists" in x.get("error", ""))  # noqa: E731
        victim_recs = [r for r in recs if r["router"] == vname]
        res["kill"] = {
            "victim": vname, "killed_after_answers": kill_after,
            "killed_at_s": t_kill - t_first if ph.t_kill is not None else None,
            "victim_answered_before_kill": sum(1 for r in victim_recs if r.get("answered_by") == vname),
            "victim_chats_cut_by_kill": sum(1 for r in recs for x in r["attempts"] if x["router"] == vname
                                            and x["t_send"] < t_kill and x.get("status") != 200),
            "victim_verdicts_cut_by_kill": sum(1 for r in recs for x in r.get("feedback", []) if x["router"] == vname
                                               and x.get("status") is None),
            "requests_failed_over": sum(1 for r in recs if len(r["attempts"]) > 1),
            "requests_failed_over_answered": sum(1 for r in recs if len(r["attempts"]) > 1 and r.get("rid")),
            "survivor_chats_after_kill": len(chat_after),
            "survivor_chats_after_kill_answered": sum(1 for x in chat_after if x.get("status") == 200),
            "survivor_chats_in_flight_at_kill": len(chat_during),
            "survivor_chats_in_flight_at_kill_answered": sum(1 for x in chat_during if x.get("status") == 200),
            "survivor_verdicts_after_kill": len(fb_after),
            "survivor_verdicts_after_kill_ok": sum(1 for x in fb_after if ok_fb(x)),
            "verdicts_already_on_record_409": sum(1 for x in verdicts if x.get("status") == 409),
            "survivor_carried_on": bool(chat_after) and all(x.get("status") == 200 for x in chat_after + chat_during)
                                   and all(ok_fb(x) for x in fb_after),
        }
    print(f"  answered {answered}/{len(qs)} in {wall:.1f} s, errors {len(errors)}, lost_updates {res['lost_updates']}, "
          f"lost_answered {res['lost_answered']}, ledger {'ok' if res['ledger_ok'] else 'FAILED'}", flush=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_relay":
        relay_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="a PostgreSQL URL (fresh databases are made on that server); default: "
                                 "a cluster of its own (scripts/pg_test_cluster.sh)")
    ap.add_argument("--routers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients per router")
    ap.add_argument("--cross-feedback", type=float, default=0.25,
                    help="share of verdicts sent to another router than the one that answered")
    ap.add_argument("--latency-ms", type=float, default=100.0, help="the upstream's latency per answer")
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument("--probes", type=int, default=20, help="sync-lag probes (phase two)")
    ap.add_argument("--late-probes", type=int, default=4, help="probes whose verdict comes 2 s after the answer")
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of answers after which the last router is "
                                                               "SIGKILLed in phase kill (negative: no kill phase)")
    ap.add_argument("--routed", action="store_true", help="model: dreamroute instead of pinned tiers")
    ap.add_argument("--isolation", choices=["auto", "netns", "loopback"], default="auto")
    ap.add_argument("--subnet", default="10.77.0", help="the private link's /24 (first three octets)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--keep-dbs", action="store_true", help="leave the phases' databases on the server")
    ap.add_argument("--keep-work", action="store_true", help="keep the configs and server logs (kept on failure)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.routers < 2:
        ap.error("--routers must be at least 2")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    from dreamroute.config.db_url import hide_password

    t_start = time.monotonic()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="federation-"))
    out: dict = {}
    net, ok = None, False
    try:
        net = Net(a.routers, a.subnet, a.isolation)
        pg = Postgres(a.db, net)
        if not a.keep_dbs:
            CLEANUP.add("databases", pg.drop_created)
        up_port = free_port(net.hub)
        up_log = open(work / "upstream.log", "w")
        upstream = subprocess.Popen([PY, str(ROOT / "benchmarks/fake_upstream.py"), "--host", net.hub, "--port",
                                     str(up_port), "--latency-ms", str(a.latency_ms)],
                                    stdout=up_log, stderr=subprocess.STDOUT)
        CLEANUP.add("upstream", lambda: (upstream.terminate(), upstream.wait(30)))
        up_url = f"http://{net.hub}:{up_port}/v1"
        wait_http(up_url + "/models", upstream)
        qs = questions(a.requests, a.seed, a.routed)
        phases = {}
        phases["two"] = run_phase("two", a.routers, qs, a, net, pg, work, up_url, probes=a.probes)
        phases["one"] = run_phase("one", 1, qs, a, net, pg, work, up_url)
        if a.kill_at >= 0:
            phases["kill"] = run_phase("kill", a.routers, qs, a, net, pg, work, up_url, kill_at=a.kill_at)
        diff = trust_diff(phases["two"].pop("_snapshot_trust"), phases["one"].pop("_snapshot_trust"))
        if "kill" in phases:
            phases["kill"].pop("_snapshot_trust")
        two, kill = phases["two"], phases.get("kill")
        lag = two.pop("sync_lag", None)
        out = {
            "routers": a.routers, "requests": a.requests,
            "lost_updates": sum(p["lost_updates"] for p in phases.values()),
            "ledgers_ok": all(p["ledger_ok"] for p in phases.values()),
            "trust_max_abs_diff": {k: diff[k] for k in ("per_version", "per_version_context", "cells_in_both",
                                                         "cells_in_one_only")},
            "sync_lag_s": {k: lag[k] for k in ("p50", "p90", "max", "mean", "probes", "observed",
                                               "fast_path_hits_on_other_router", "method")} if lag else None,
            "late_verdict_sync": {k: v for k, v in lag["late_verdict"].items() if k != "samples"} if lag else None,
            "observer_memory": two.get("observer"),
            "lost_answered": sum(p["lost_answered"] for p in phases.values()),
            "sigkill": ({**kill["kill"], "lost_answered": kill["lost_answered"], "lost_verdicts": kill["lost_verdicts"],
                         "lost_updates": kill["lost_updates"], "ledger_ok": kill["ledger_ok"],
                         "stored_unanswered": kill["stored_unanswered"]} if kill else None),
            "isolation": net.isolation, "isolation_note": net.why_loopback,
            "hosts": {"hub": net.hub, "routers": net.hosts},
            "db": hide_password(a.db) if a.db else "own cluster (scripts/pg_test_cluster.sh), "
                  + hide_password(pg.url.render_as_string(hide_password=False)),
            "db_route": "relay" if pg.relay is not None else "direct",
            "upstream": {"kind": "benchmarks/fake_upstream.py", "latency_ms": a.latency_ms, "url": up_url},
            "workload": {"pinned": not a.routed, "clients_per_router": a.clients, "cross_feedback": a.cross_feedback,
                         "questions_right": sum(q["right"] for q in qs),
                         "by_model": {m: sum(1 for q in qs if q["model"] == m) for m in {q["model"] for q in qs}}},
            "config": {"router.forgetting": 1.0, "cache.enabled": False, "store.sync_interval_s": 1.0,
                       "max_in_flight": a.max_in_flight},
            "phases": phases, "trust_comparison": diff,
            "sync_lag_samples": lag["samples"] + lag["late_verdict"].pop("samples") if lag else None,
            "cores": os.cpu_count(), "load_average_start": load_start[0],
            "load_average_end": os.getloadavg()[0],
            "command": " ".join([Path(sys.argv[0]).as_posix()] + [hide_password(x) for x in sys.argv[1:]]),
        }
        ok = True
    finally:
        CLEANUP.run()
        if net is not None:
            out["leftover_links_after_cleanup"] = net.leftovers()
        if ok and not a.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"federation: logs and configs kept in {work}", file=sys.stderr)
    out["wall_s"] = time.monotonic() - t_start
    print(json.dumps({k: v for k, v in out.items() if k not in ("phases", "trust_comparison", "sync_lag_samples")},
                     indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
