"""Prometheus metrics of one app, in a registry of its own (two apps in a process never mix).

Counters (``_total`` in the exposition):

- ``dreamroute_requests{tier, context, status}``: chat completions by answering tier, context
  and HTTP status (errors: ``tier="none"``; fast-path hits count here too).
- ``dreamroute_atp_joules{tier}``: ATP of model calls, J (surprise scoring under its tier).
- ``dreamroute_fast_path_hits``, ``dreamroute_escalations``, ``dreamroute_audits``.
- ``dreamroute_backend_failures{tier}``: failed backend calls (the request fell back).
- ``dreamroute_errors{type}``: error responses by code (or type when there is no code).

Histogram ``dreamroute_request_latency_seconds{path}`` (``routed`` | ``forced`` |
``fast_path``). Gauges read at scrape time: ``dreamroute_trust{tier, context}`` (posterior
mean of each tier's active version), ``dreamroute_lambda``, ``dreamroute_budget_joules``,
``dreamroute_atp_spent_joules``, ``dreamroute_routed_requests``,
``dreamroute_fast_path_entries``, ``dreamroute_tier_cooling{tier}`` (1 while cooling down),
``dreamroute_tier_loaded{tier}`` (1 while its model is in memory), and with a metabolic
controller ``dreamroute_metabolic_state{state}`` (1 for the current state),
``dreamroute_metabolic_transitions`` (state changes since start), ``dreamroute_dream_backlog``,
``dreamroute_dream_running`` and ``dreamroute_budget_left_ratio`` (of the period's budget).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _State:
    """Collector of the gauges read from the DreamRoute at scrape time."""

    def __init__(self, dr, metabolism=lambda: None):
        self.dr, self.metabolism = dr, metabolism

    def describe(self):
        return []

    def collect(self):
        dr = self.dr
        trust = GaugeMetricFamily("dreamroute_trust", "Trust (posterior mean P(success)) of each tier's active "
                                  "model version per context", labels=["tier", "context"])
        active = set(dr.memory.versions.values())
        for r in dr.store.trust_table():
            if r.model_version_id in active:
                trust.add_metric([r.tier, r.context], r.mean)
        yield trust
        p = dr.pacer
        yield GaugeMetricFamily("dreamroute_lambda", "Budget multiplier lambda of the pacer", value=p.lam)
        yield GaugeMetricFamily("dreamroute_budget_joules", "ATP budget per routed request, J (-1: none)",
                                value=-1.0 if p.budget is None else p.budget)
        yield GaugeMetricFamily("dreamroute_atp_spent_joules", "ATP spent since start, J", value=p.spent)
        yield GaugeMetricFamily("dreamroute_routed_requests", "Requests routed since start", value=p.n)
        yield GaugeMetricFamily("dreamroute_fast_path_entries", "Answers the fast path may serve",
                                value=len(dr.responses) if dr.responses is not None else 0)
        cooling = GaugeMetricFamily("dreamroute_tier_cooling", "1 while a tier cools down after a backend "
                                    "failure", labels=["tier"])
        left = dr.engine.cooldown.remaining()
        for t in dr.engine.tiers:
            cooling.add_metric([t], 1.0 if t in left else 0.0)
        yield cooling
        loaded = GaugeMetricFamily("dreamroute_tier_loaded", "1 while a tier's model is in memory", labels=["tier"])
        for t in dr.engine.tiers:
            loaded.add_metric([t], 1.0 if getattr(dr.backends[t], "loaded", True) else 0.0)
        yield loaded
        m = self.metabolism()
        if m is None:
            return
        from ..signals.metabolic import State
        state = GaugeMetricFamily("dreamroute_metabolic_state", "1 for the current metabolic state",
                                  labels=["state"])
        for s in State:
            state.add_metric([s.value], 1.0 if m.ctl.state is s else 0.0)
        yield state
        yield GaugeMetricFamily("dreamroute_metabolic_transitions", "Metabolic state changes kept in history",
                                value=len(m.ctl.history))
        yield GaugeMetricFamily("dreamroute_dream_backlog", "Witnessed teacher successes since the last DREAM "
                                "cycle", value=m.ctl.backlog)
        yield GaugeMetricFamily("dreamroute_dream_running", "1 while a DREAM cycle process runs",
                                value=1.0 if m.proc is not None else 0.0)
        yield GaugeMetricFamily("dreamroute_budget_left_ratio", "Fraction of the period's ATP budget left",
                                value=m.ctl.budget_left())


class ServerMetrics:
    """The app's metrics. Args: dr: the served DreamRoute (gauges read it at scrape time);
    metabolism: returns the app's Metabolism or None (read at scrape time)."""

    def __init__(self, dr, metabolism=lambda: None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dreamroute_requests", "Chat completion requests by answering tier, context "
                                "and HTTP status", ["tier", "context", "status"], registry=r)
        self.atp = Counter("dreamroute_atp_joules", "ATP of model calls, J", ["tier"], registry=r)
        self.latency = Histogram("dreamroute_request_latency_seconds", "Chat completion latency in the "
                                 "server, s", ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.fast_path_hits = Counter("dreamroute_fast_path_hits", "Requests answered by the fast path",
                                      registry=r)
        self.escalations = Counter("dreamroute_escalations", "Escalated calls", registry=r)
        self.audits = Counter("dreamroute_audits", "Audit calls", registry=r)
        self.backend_failures = Counter("dreamroute_backend_failures", "Failed backend calls (fell back)",
                                        ["tier"], registry=r)
        self.errors = Counter("dreamroute_errors", "Error responses by code or type", ["type"], registry=r)
        r.register(_State(dr, metabolism))

    def answered(self, ans, path: str, seconds: float) -> None:
        """Count a routed answer (a :class:`~dreamroute.router.types.Answer`)."""
        self.requests.labels(ans.tier, ans.decision.context, "200").inc()
        for c in ans.calls:
            self.atp.labels(c.tier).inc(c.atp)
        if ans.surprise_atp:
            self.atp.labels(ans.surprise_tier or ans.calls[0].tier).inc(ans.surprise_atp)
        n_esc = sum(c.role == "escalated" for c in ans.calls)
        if n_esc:
            self.escalations.inc(n_esc)
        if ans.audited:
            self.audits.inc()
        self.latency.labels(path).observe(seconds)

    def hit(self, tier: str, context: str, seconds: float) -> None:
        """Count a fast-path hit."""
        self.fast_path_hits.inc()
        self.requests.labels(tier, context, "200").inc()
        self.latency.labels("fast_path").observe(seconds)

    def error(self, status: int, kind: str, chat: bool) -> None:
        """Count an error response (``chat``: it answered a chat completion request)."""
        self.errors.labels(kind).inc()
        if chat:
            self.requests.labels("none", "none", str(status)).inc()

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
