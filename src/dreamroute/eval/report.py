"""Run reports, computed from what the store holds for a run (so a resumed run reports all of it)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from rich.console import Console
from rich.table import Table


def summarize_run(experiences: list[dict], trust: list[dict], overhead_ms: list[float]) -> dict:
    """Summary of a run.

    Args:
        experiences: the run's experience rows (store dicts) in id order.
        trust: ``{model, tier, context, trust, n}`` rows.
        overhead_ms: router decision times of this invocation, ms.

    Returns the JSON object of ``dreamroute run --json``: ``n``, ``accuracy``,
    ``atp_joules`` (total, J), ``atp_per_request``, ``tier_counts`` (answering
    tier), ``context_counts``, ``tier_by_context``, ``calls`` (every call per
    tier), ``escalations``, ``audits``, ``trust``, ``router_overhead_ms``
    ({p50, p99}, None when no decision was timed).
    """
    by_req: dict[str, list[dict]] = defaultdict(list)
    for e in experiences:
        by_req[e["request_id"]].append(e)
    n = len(by_req)
    correct = graded = 0
    tiers, contexts, calls = Counter(), Counter(), Counter()
    tier_ctx: dict[str, Counter] = defaultdict(Counter)
    esc = aud = 0
    atp = 0.0
    for rows in by_req.values():
        final = [r for r in rows if r["role"] != "audit"][-1]
        tiers[final["tier"]] += 1
        contexts[final["context"]] += 1
        tier_ctx[final["context"]][final["tier"]] += 1
        esc += sum(1 for r in rows if r["role"] == "escalated")
        aud += sum(1 for r in rows if r["role"] == "audit")
        for r in rows:
            calls[r["tier"]] += 1
            atp += r["atp_joules"] or 0.0
        if final["outcome"] in ("success", "failure") and final["witness"] == "ground_truth":
            graded += 1
            correct += final["outcome"] == "success"
    ov = np.asarray(overhead_ms, dtype=float)
    return {
        "n": n,
        "graded": graded,
        "accuracy": correct / graded if graded else None,
        "atp_joules": atp,
        "atp_per_request": atp / n if n else 0.0,
        "tier_counts": dict(tiers),
        "context_counts": dict(contexts),
        "tier_by_context": {c: dict(v) for c, v in tier_ctx.items()},
        "calls": dict(calls),
        "escalations": esc,
        "audits": aud,
        "trust": trust,
        "router_overhead_ms": {"p50": float(np.percentile(ov, 50)), "p99": float(np.percentile(ov, 99))}
        if len(ov) else {"p50": None, "p99": None},
    }


def print_report(summary: dict, tiers: list[str], console: Console | None = None, title: str = "run") -> None:
    """Rich tables: totals, tier mix per context, trust."""
    console = console or Console()
    acc = summary["accuracy"]
    t = Table(title=f"dreamroute {title}", show_header=False)
    t.add_row("requests", str(summary["n"]))
    t.add_row("accuracy", "n/a" if acc is None else f"{acc:.1%} of {summary['graded']} graded")
    t.add_row("ATP total", f"{summary['atp_joules']:.1f} J")
    t.add_row("ATP per request", f"{summary['atp_per_request']:.2f} J")
    t.add_row("escalations", str(summary["escalations"]))
    t.add_row("audits", str(summary["audits"]))
    if summary.get("failed_items"):
        t.add_row("not answered", f"{len(summary['failed_items'])} item(s): no tier within the budget; "
                                  "rerun to retry them")
    ov = summary["router_overhead_ms"]
    if ov["p50"] is not None:
        t.add_row("router overhead", f"p50 {ov['p50']:.2f} ms, p99 {ov['p99']:.2f} ms")
    console.print(t)
    mix = Table(title="answering tier per context")
    mix.add_column("context")
    for tier in tiers:
        mix.add_column(tier, justify="right")
    for ctx, counts in sorted(summary["tier_by_context"].items()):
        mix.add_row(ctx, *[str(counts.get(tier, 0)) for tier in tiers])
    console.print(mix)
    print_trust(summary["trust"], console)


def print_trust(trust: list[dict], console: Console | None = None) -> None:
    console = console or Console()
    tt = Table(title="trust (Beta posterior mean) per model version × context")
    for col in ("tier", "model", "context", "trust", "n"):
        tt.add_column(col, justify="right" if col in ("trust", "n") else "left")
    for r in trust:
        tt.add_row(r["tier"], r["model"], r["context"], f"{r['trust']:.3f}", str(r["n"]))
    console.print(tt)
