"""``dreamroute simulate``: replay recorded outcomes through the live router.

The same :class:`~dreamroute.router.engine.Engine` decides as in ``run``;
only the backends differ (they answer from the recording). Feedback is
bandit feedback: after the policy has committed, the driver looks up the
recorded grade of each tier that actually answered (chosen, escalated,
audited) and nothing else, and each of those calls is charged its ATP.

Cost–quality curves: ``--sweep K`` runs K points of a policy's knob (the
budget for ``dreamroute``, the threshold for ``cascade``, the top-tier
probability for ``random``); each point and seed starts from an empty store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..api import DreamRoute
from ..backends.replay import ReplayBackend, ReplayCursor
from ..config import Settings, TierConfig
from ..router.policy_base import BasePolicy
from ..router.types import Outcome, Request
from ..store.store import Store
from . import metrics
from .spend import spend_summary
from .recorded import load_recorded
from .recorded_set import RecordedItem, RecordedSet, oracle_tier


class OraclePolicy(BasePolicy):
    """The cheapest tier whose recorded answer is correct (the cheapest tier if none is),
    as in RouterBench's oracle. Only replay can run it: it reads the recording."""

    def __init__(self, tiers: list[str], cursor: ReplayCursor, seed: int = 0):
        super().__init__(tiers, seed)
        self.cursor = cursor
        self.name = "oracle"

    def route(self, request, view):
        return self._decision(request, view, oracle_tier(self.cursor.item, self.tiers))


def replay_settings(settings: Settings, rs: RecordedSet) -> Settings:
    """Tiers of the recording, cheapest first; a tier named as in ``settings`` keeps its
    config (watts, size, identity, hence its ``bench`` calibration)."""
    known = {t.name: t for t in settings.tiers}
    tiers = []
    for name in rs.tiers:
        model = next(iter(it.calls[name].model for it in rs.items[:1]), name)
        tiers.append(known[name] if name in known else
                     TierConfig(name=name, model=model, backend="replay", params_b=1.0))
    cache = settings.cache.model_copy(update={"enabled": False})  # a recording has no KV state
    return settings.model_copy(update={"tiers": tiers, "cache": cache})


@dataclass
class ReplayRun:
    """One replay: the run summary plus cost fraction inputs."""

    accuracy: float
    atp: float
    n: int
    tier_counts: dict
    calls: dict
    audits: int
    escalations: int
    top_calls: int
    trace: list = None  # one dict per request, in order (see dreamroute.eval.spend)


def _order(rs: RecordedSet, shuffle: int | None) -> list[RecordedItem]:
    items = list(rs.items)
    if shuffle is not None:
        np.random.default_rng(shuffle).shuffle(items)
    return items


def replay_once(settings: Settings, rs: RecordedSet, policy: str, *, budget: float | None, seed: int,
                shuffle: int | None, db: Path | None = None, grades: dict | None = None,
                progress: Progress | None = None) -> ReplayRun:
    """Replay every item once with one policy; learning in ``db`` or an in-memory store.

    ``grades`` overrides the recorded grade per (item key, tier) (used by tests that
    shuffle grades to prove none reaches the router before it commits).
    """
    sset = replay_settings(settings, rs)
    cursor = ReplayCursor(rs)
    backends = {t.name: ReplayBackend(t.name, rs, cursor=cursor, identity=_identity(t)) for t in sset.tiers}
    store = Store(db) if db else Store(None)
    spec = "always:" + rs.tiers[0] if policy == "oracle" else policy
    dr = DreamRoute(sset, policy=spec, budget=budget, seed=seed, backends=backends, store=store)
    for t, fixed in fixed_costs(rs).items():  # the recording's own unit cost replaces the formula
        dr.memory.costs[t] = replace(dr.memory.costs[t], per_call=fixed)
    if policy == "oracle":
        dr.engine.policy = dr.policy = OraclePolicy(rs.tiers, cursor, seed)
    top = rs.tiers[-1]
    right = 0
    counts: dict[str, int] = {}
    calls: dict[str, int] = {}
    audits = escalations = top_calls = 0
    trace: list[dict] = []
    task = progress.add_task(f"{policy} b={budget}", total=len(rs.items)) if progress else None
    try:
        for item in _order(rs, shuffle):
            cursor.select(item.key)
            req = Request.from_prompt(item.prompt, grader=item.grader, item_key=item.key)
            ans = dr.engine.answer(req)
            outcomes = []
            for c in ans.calls:  # bandit feedback: only the tiers that answered
                ok = grades[(item.key, c.tier)] if grades is not None else item.calls[c.tier].correct
                oc = "success" if ok else "failure"
                outcomes.append(Outcome(oc, "ground_truth", 1.0 if ok else 0.0, item.gold, c.predicted))
            dr.engine.learn(ans, outcomes)
            final = ans.calls.index(ans.final)
            right += outcomes[final].outcome == "success"
            trace.append({"i": len(trace), "key": item.key, "tiers": [c.tier for c in ans.calls],
                          "roles": [c.role for c in ans.calls], "atp_joules": ans.atp,
                          "correct": outcomes[final].outcome == "success", "final": ans.tier,
                          "lam": ans.decision.lam})
            counts[ans.tier] = counts.get(ans.tier, 0) + 1
            for c in ans.calls:
                calls[c.tier] = calls.get(c.tier, 0) + 1
                top_calls += c.tier == top
            audits += ans.audited
            escalations += sum(c.role == "escalated" for c in ans.calls)
            if progress:
                progress.advance(task)
        atp = dr.pacer.spent
    finally:
        dr.close()
        store.close()
        if progress:
            progress.remove_task(task)
    n = len(rs.items)
    return ReplayRun(right / n, atp, n, counts, calls, audits, escalations, top_calls, trace)


def fixed_costs(rs: RecordedSet) -> dict[str, float]:
    """Tiers whose cost the recording fixes: RouteLLM's (every call the same ``atp_joules``: weak 0,
    strong 1), and tiers whose every call has an ``atp_joules`` and no token counts (the mean,
    the estimate before the tier's first call, as ``bench``'s calibration is live; each call is
    still charged its own recorded ATP)."""
    out = {}
    for t in rs.tiers:
        calls = [it.calls[t] for it in rs.items]
        vals = {c.atp_joules for c in calls}
        if len(vals) == 1 and None not in vals and rs.kind == "routellm":
            out[t] = float(vals.pop())
        elif calls and None not in vals and all(c.prompt_tokens is None and c.completion_tokens is None
                                                for c in calls):
            out[t] = float(np.mean([c.atp_joules for c in calls]))
    return out


def _identity(t: TierConfig) -> str:
    if t.source is not None and t.source.sha256:
        return t.source.sha256
    return f"replay:{t.name}:{t.model}"


def sweep_values(policy: str, k: int, cheapest_atp: float, top_atp: float) -> list[tuple[str, float | None]]:
    """(policy spec, budget) for each of K sweep points."""
    if k < 2:
        raise ValueError(f"--sweep needs at least 2 points, got {k}")
    grid = np.linspace(0.0, 1.0, k)
    if policy == "dreamroute":
        return [("dreamroute", float(cheapest_atp + g * (top_atp - cheapest_atp))) for g in grid]
    if policy.split(":")[0] == "cascade":
        return [(f"cascade:{g:.4f}", None) for g in grid]
    if policy.split(":")[0] == "random":
        return [(f"random:{g:.4f}", None) for g in grid]
    raise ValueError(f"--sweep works for dreamroute, cascade and random, not {policy!r}")


def simulate(settings: Settings, recorded: str | Path, *, policy: str = "dreamroute", sweep: int | None = None,
             shuffle: int | None = None, seeds: int = 1, budget: float | None = None, seed: int = 0,
             db: Path | None = None, console: Console | None = None, progress: bool = True,
             grades: dict | None = None, budget_fraction: float | None = None) -> dict:
    """Replay a recording with one policy (or a sweep of it) and compute the metrics.

    Returns the ``--json`` object: ``policy``, ``n``, ``accuracy``, ``atp_joules``,
    ``strong_fraction``, ``tier_counts``, ``audits``, ``escalations``, ``singles``
    (each tier alone and the oracle: ``{cost_fraction, accuracy}``), ``trace`` (the
    first seed's run of ``policy`` at ``budget``: one object per request in order,
    ``{i, key, tiers, roles, atp_joules, correct, final, lam}``), ``spend`` (its
    :func:`~dreamroute.eval.spend.spend_summary`, and ``spend_seeds``: each seed's); with a
    sweep also ``points``, ``apgr``, ``cpt`` and ``aiq`` (see :mod:`dreamroute.eval.metrics`).
    Single-policy figures are the mean over ``seeds`` seeds. ``budget_fraction`` F sets the
    budget to F × the top tier's mean ATP per item on this recording (measured by its
    ``always:TOP`` replay; it replaces ``budget``), so a setting such as "85 % of the top tier's
    ATP" does not depend on this machine's calibration.
    """
    rs = recorded if isinstance(recorded, RecordedSet) else load_recorded(recorded)
    console = console or Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not progress, transient=True) as bar:
        singles = {t: replay_once(settings, rs, f"always:{t}", budget=None, seed=seed, shuffle=shuffle)
                   for t in rs.tiers}
        oracle = replay_once(settings, rs, "oracle", budget=None, seed=seed, shuffle=shuffle)
        top_atp = singles[rs.tiers[-1]].atp or 1.0
        if budget_fraction is not None:
            if not budget_fraction >= 0:
                raise ValueError(f"budget_fraction must be >= 0, got {budget_fraction}")
            budget = budget_fraction * top_atp / len(rs.items)

        def point(r: ReplayRun) -> dict:
            return {"cost_fraction": r.atp / top_atp, "accuracy": r.accuracy}

        def run_seeds(spec: str, b: float | None, path: Path | None) -> list[ReplayRun]:
            out = []
            for s in range(seeds):
                sh = None if shuffle is None else shuffle + s
                out.append(replay_once(settings, rs, spec, budget=b, seed=seed + s, shuffle=sh, db=path,
                                       grades=grades, progress=bar))
            return out

        result: dict = {"policy": policy, "recording": rs.name, "n": len(rs.items), "seeds": seeds,
                        "shuffle": shuffle, "tiers": rs.tiers, "top_atp_joules": top_atp,
                        "singles": {t: point(r) for t, r in singles.items()}, "oracle": point(oracle)}
        main = run_seeds(policy, budget, db) if policy != "oracle" else [oracle]
        result.update(_mean_summary(main, rs.tiers[-1]))
        result["budget"] = budget
        result["budget_fraction"] = budget_fraction
        result["trace"] = main[0].trace
        result["spend"] = spend_summary(main[0].trace, budget)
        result["spend_seeds"] = [spend_summary(r.trace, budget) for r in main]
        if sweep:
            n_req = len(rs.items)
            values = sweep_values(policy, sweep, singles[rs.tiers[0]].atp / n_req, top_atp / n_req)
            curves = [[] for _ in range(seeds)]
            for i, (spec, b) in enumerate(values):
                path = None if db is None else db.with_name(f"{db.stem}.p{i}{db.suffix}")
                for s, r in enumerate(run_seeds(spec, b, path)):
                    curves[s].append((r.atp / top_atp, r.accuracy))
            pts = metrics.average_curves(curves)
            weak, strong = singles[rs.tiers[0]].accuracy, singles[rs.tiers[-1]].accuracy
            x0 = singles[rs.tiers[0]].atp / top_atp
            result["points"] = [{"cost_fraction": x, "accuracy": y, "knob": v[1] if v[1] is not None else
                                 float(v[0].split(":")[1])} for (x, y), v in zip(pts, values)]
            result["apgr"] = metrics.apgr(pts, weak, strong, x0)
            result["cpt"] = metrics.cpt_table(pts, weak, strong, x0)
            result["aiq"] = metrics.aiq(pts)
    return result


def _mean_summary(runs: list[ReplayRun], top: str) -> dict:
    n = runs[0].n
    tiers = sorted({t for r in runs for t in r.tier_counts})
    return {
        "accuracy": float(np.mean([r.accuracy for r in runs])),
        "atp_joules": float(np.mean([r.atp for r in runs])),
        "strong_fraction": float(np.mean([r.top_calls / n for r in runs])),
        "tier_counts": {t: float(np.mean([r.tier_counts.get(t, 0) for r in runs])) for t in tiers},
        "audits": float(np.mean([r.audits for r in runs])),
        "escalations": float(np.mean([r.escalations for r in runs])),
    }


def print_simulation(res: dict, console: Console | None = None) -> None:
    """Rich tables: the policy's figures, each tier alone and the oracle, and the sweep's metrics."""
    from rich.table import Table
    console = console or Console()
    t = Table(title=f"simulate {res['policy']} on {res['recording']} ({res['n']} items, {res['seeds']} seed(s))")
    for c in ("run", "accuracy", "cost fraction", "strong/top calls per item", "audits", "escalations"):
        t.add_column(c, justify="left" if c == "run" else "right")
    top = res["top_atp_joules"] or 1.0
    t.add_row(res["policy"], f"{res['accuracy']:.1%}", f"{res['atp_joules'] / top:.3f}",
              f"{res['strong_fraction']:.3f}", f"{res['audits']:.0f}", f"{res['escalations']:.0f}")
    for name, p in res["singles"].items():
        t.add_row(f"always:{name}", f"{p['accuracy']:.1%}", f"{p['cost_fraction']:.3f}", "", "", "")
    t.add_row("oracle", f"{res['oracle']['accuracy']:.1%}", f"{res['oracle']['cost_fraction']:.3f}", "", "", "")
    console.print(t)
    if "points" in res:
        cpt = res["cpt"]
        fmt = lambda v: "never" if v is None else f"{v:.1%}"  # noqa: E731
        console.print(f"APGR {res['apgr']:.3f}   CPT(20%) {fmt(cpt['20'])}   CPT(50%) {fmt(cpt['50'])}   "
                      f"CPT(80%) {fmt(cpt['80'])}   AIQ {res['aiq']:.3f}")
