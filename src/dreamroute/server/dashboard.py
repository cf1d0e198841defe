"""The dashboard's data: what ``GET /dashboard/data`` returns and ``/dashboard`` draws.

Everything comes from the store (experiences, the ledger's trust updates, DREAM
cycles) and the live controllers (pacer, metabolic state), so the page shows
what was measured, including what happened before this server started:

* ``trust``: per tier × context, the trust (posterior mean) after each ledgered
  update, oldest first: ``{tier: {context: [[unix_s, trust], ...]}}``.
* ``atp``: per request (newest ``limit``), its time and ATP (all calls, J), with
  the cumulative spend and the budget line (requests × budget) when a budget is set.
* ``tier_mix``: answers per answering tier (the last non-audit call of a request) over
  those requests, with every tier that has a call among them (0 for a tier that only
  answered before an escalation or audited), cheapest tier first.
* ``tier_calls``: per tier in ``tier_mix``, its calls among those requests by role
  (``chosen``, ``escalated``, ``audit``).
* ``cost_quality``: per tier, mean ATP per answer (J) and success rate among
  its graded answers (chosen and escalated calls), with the counts behind them.
* ``metabolic``: the controller's snapshot (state, signals, transition history), or None.
* ``cycles``: the last DREAM cycles (id, student, teacher, stage, status, held-out
  and regression accuracy before/after, when).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

PAGE = Path(__file__).with_name("dashboard.html")
CONTEXTS = ("stable", "moving", "unstable", "novel")


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def dashboard_data(store, *, budget: float | None = None, metabolic: dict | None = None,
                   limit: int = 500, ledger_limit: int = 5000) -> dict:
    """The dashboard's JSON (see the module docstring).

    Args:
        store: an open :class:`~dreamroute.store.store.Store`.
        budget: average ATP per request the router paces to, J (None: no budget line).
        metabolic: the metabolic controller's snapshot, if one runs.
        limit: most recent experiences read (≈ requests × calls each).
        ledger_limit: most recent ledger entries read for the trust series.
    """
    versions = {}
    for tier, v in store.active_versions().items():
        versions[v.id] = tier
    trust: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for e in store.ledger_entries(limit=ledger_limit):
        if e["action"] != "trust.update" or not e["entity"].startswith("model_version:"):
            continue
        vid, _, ctx = e["entity"][len("model_version:"):].partition("/")
        vid = int(vid)
        if vid not in versions:
            try:
                versions[vid] = store.get_version(vid).tier
            except Exception:  # a version row missing is shown under its id
                versions[vid] = f"version {vid}"
        after = e["delta"].get("trust_after")
        if after is not None:
            trust[versions[vid]][ctx].append([_ts(e["created_at"]), round(float(after), 5)])

    n = store.count_experiences()
    rows = store.experiences(["id", "request_id", "role", "tier", "atp_joules", "outcome", "created_at"],
                             since_id=max(0, n - limit))
    requests: dict[str, dict] = {}
    graded: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    spent: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        calls[r["tier"]][r["role"]] += 1
        q = requests.setdefault(r["request_id"], {"t": _ts(r["created_at"]), "atp": 0.0, "tier": None})
        q["atp"] += float(r["atp_joules"] or 0.0)
        if r["role"] != "audit":
            q["tier"] = r["tier"]  # the last non-audit call answered
            spent[r["tier"]].append(float(r["atp_joules"] or 0.0))
            if r["outcome"] in ("success", "failure"):
                graded[r["tier"]][0 if r["outcome"] == "success" else 1] += 1
    seq = sorted(requests.values(), key=lambda q: q["t"] or 0.0)
    cum, points = 0.0, []
    for i, q in enumerate(seq, 1):
        cum += q["atp"]
        points.append({"t": q["t"], "atp": round(q["atp"], 3), "cumulative": round(cum, 3),
                       "budget": round(budget * i, 3) if budget is not None else None})
    final = Counter(q["tier"] for q in seq if q["tier"])
    order = list(store.active_versions())  # registration order: the hierarchy, cheapest first
    tiers = [t for t in order if t in calls] + sorted(t for t in calls if t not in order)
    mix = {t: final.get(t, 0) for t in tiers}
    cq = {}
    for tier, costs in spent.items():
        s, f = graded[tier]
        cq[tier] = {"mean_atp": sum(costs) / len(costs), "answers": len(costs), "graded": s + f,
                    "success_rate": s / (s + f) if s + f else None}
    cycles = [{"id": c["id"], "student": c["student"], "teacher": c["teacher"], "stage": c["stage"],
               "status": c["status"], "created_at": c.get("created_at"), "updated_at": c.get("updated_at"),
               "heldout": [c["result"].get("heldout_before"), c["result"].get("heldout_after")],
               "regression": [c["result"].get("regression_before"), c["result"].get("regression_after")],
               "examples": c["result"].get("examples")}
              for c in store.cycles()[:10]]
    return {"trust": {t: dict(by) for t, by in trust.items()}, "atp": points, "budget": budget,
            "tier_mix": mix, "tier_calls": {t: dict(calls[t]) for t in tiers}, "cost_quality": cq, "metabolic": metabolic, "cycles": cycles,
            "requests": len(seq)}


def dashboard_page() -> str:
    """The dashboard's HTML (self-contained: inline SVG charts, no external scripts)."""
    return PAGE.read_text(encoding="utf-8")
