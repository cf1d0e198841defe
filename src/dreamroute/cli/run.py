"""``dreamroute run``, ``demo``, ``collect`` and ``simulate``: route workloads live, record
every tier's outcomes, and replay recordings through the same router."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from ..config import Settings
from .common import ConfigOpt, DbOpt, console, handle_errors, settings_for


def _run_and_report(settings: Settings, spec: str, *, policy, budget, seed, limit, fresh, db, json_path,
                    title: str, max_tokens: int = 320) -> dict:
    from ..eval.report import print_report
    from ..eval.runner import run_workload, write_json
    res = run_workload(settings, spec, policy=policy, budget=budget, seed=seed, limit=limit, fresh=fresh,
                       db=db, console=console, max_tokens=max_tokens)
    if res.skipped:
        console.print(f"resumed run {res.run_id}: {res.skipped} item(s) already graded were skipped")
    print_report(res.summary, settings.tier_names, console, title=title)
    if json_path:
        write_json(json_path, res.summary)
        console.print(f"wrote {json_path}")
    if res.error is not None:
        raise type(res.error)(f"{res.error} (the {res.answered} items before it were answered and stored)")
    return res.summary


@handle_errors
def run(workload: str = typer.Argument(..., help="GSM8K JSONL, generic JSONL (prompt, answer, grader), conversation JSONL (turns) or builtin:arithmetic"),
        limit: Optional[int] = typer.Option(None, min=0, help="Only the first N items (conversation turns count one each)."),
        policy: str = typer.Option("dreamroute", help="dreamroute | always:TIER | random[:P] | cascade[:T]"),
        budget: Optional[float] = typer.Option(None, min=0, help="Average ATP per request the run may spend, J."),
        seed: int = typer.Option(0, min=0, help="Seed of every random choice."),
        fresh: bool = typer.Option(False, "--fresh", help="Start a new attempt instead of resuming."),
        json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
        max_tokens: int = typer.Option(320, min=1, help="Generation limit per call."),
        no_cache: bool = typer.Option(False, "--no-cache", help="Do not keep or restore conversation KV states."),
        config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Route a workload live, grade each answer, learn online, and report. Resumable.

    Conversation workloads (records with "turns", e.g. MT-Bench's question.jsonl) send each
    turn with the conversation so far, reusing its KV state from the reality cache.
    """
    settings = settings_for(config, db)
    if no_cache:
        settings = settings.model_copy(update={"cache": settings.cache.model_copy(update={"enabled": False})})
    _run_and_report(settings, workload, policy=policy, budget=budget, seed=seed, limit=limit, fresh=fresh,
                    db=db, json_path=json_path, title=f"run {policy}", max_tokens=max_tokens)


@handle_errors
def demo(n: int = typer.Option(40, min=1, help="Generated problems to route (levels 1-5 interleaved)."),
         budget: Optional[float] = typer.Option(90.0, min=0, help="Average ATP per request, J."),
         seed: int = typer.Option(0), json_path: Optional[Path] = typer.Option(None, "--json"),
         config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """The main job on the default hierarchy: route generated arithmetic word problems and show the trust learned.

    Starts from an empty store (a temporary one unless --db is given), so the
    trust shown is what this run learned.
    """
    from ..config.db_url import hide_password
    settings = settings_for(config, db)
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="dreamroute-demo-")
        db = Path(tmp.name) / "demo.db"
    console.print(f"[bold]dreamroute demo[/]: {n} arithmetic word problems (1-5 steps) over "
                  f"{', '.join(settings.tier_names)}; budget {budget} J/request; store {hide_password(db)}")
    try:
        _run_and_report(settings, f"builtin:arithmetic?n={n}", policy="dreamroute", budget=budget, seed=seed,
                        limit=None, fresh=True, db=db, json_path=json_path, title="demo", max_tokens=320)
    finally:
        if tmp is not None:
            tmp.cleanup()


@handle_errors
def collect(workload: str = typer.Argument(..., help="Workload to record (as for run)."),
            tiers: Optional[list[str]] = typer.Option(None, "--tiers", help="Tiers to run (default: all)."),
            limit: Optional[int] = typer.Option(None, min=0, help="Only the first N items (conversation turns count one each)."),
            out: Path = typer.Option(..., "--out", help="Recorded-outcome JSONL to write (resumable)."),
            config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Run every chosen tier on every item once and record the outcomes, for replay with `simulate`."""
    from ..eval.collect import collect as do_collect
    settings = settings_for(config, db)
    for t in tiers or []:
        settings.tier(t)
    res = do_collect(settings, workload, tiers=tiers, limit=limit, out=out, console=console)
    console.print(res)


@handle_errors
def simulate(recorded: Path = typer.Argument(..., help="Recorded outcomes: a collect/local_tiers JSONL, a RouteLLM CSV, or a directory of them."),
             policy: str = typer.Option("dreamroute", help="dreamroute | always:TIER | random[:P] | cascade[:T] | oracle"),
             sweep: Optional[int] = typer.Option(None, help="K runs across the policy's knob (budget, threshold, P)."),
             shuffle: Optional[int] = typer.Option(None, help="Replay in an order shuffled with this seed."),
             seeds: int = typer.Option(1, help="Repeat everything random N times and average."),
             budget: Optional[float] = typer.Option(None, help="Average ATP per request (single run)."),
             budget_fraction: Optional[float] = typer.Option(None, min=0, help="Budget as a fraction of the top tier's mean ATP on this recording (replaces --budget)."),
             seed: int = typer.Option(0), plot: Optional[Path] = typer.Option(None, help="Cost-quality PNG; beside it STEM_spend.png, the running ATP per request against the budget."),
             json_path: Optional[Path] = typer.Option(None, "--json"),
             config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Replay recorded outcomes through the live router (bandit feedback), with metrics and a curve."""
    from ..eval.runner import write_json
    from ..eval.simulate import print_simulation, simulate as do_simulate
    settings = settings_for(config, None)
    res = do_simulate(settings, recorded, policy=policy, sweep=sweep, shuffle=shuffle, seeds=seeds, budget=budget,
                      seed=seed, db=db, console=console, budget_fraction=budget_fraction)
    budget = res["budget"]
    print_simulation(res, console)
    if plot:
        from ..eval.plot import plot_cost_quality
        curves = {policy: [(p["cost_fraction"], p["accuracy"]) for p in res.get("points", [])]} if sweep else {}
        singles = {t: (v["cost_fraction"], v["accuracy"]) for t, v in res["singles"].items()}
        if not sweep:
            singles[policy] = (res["atp_joules"] / max(1e-12, res["top_atp_joules"]), res["accuracy"])
        plot_cost_quality(plot, curves, singles, (res["oracle"]["cost_fraction"], res["oracle"]["accuracy"]),
                          f"{policy} on {res['recording']}")
        console.print(f"wrote {plot}")
        from ..eval.spend import plot_spend
        spend_png = plot.with_name(f"{plot.stem}_spend{plot.suffix or '.png'}")
        plot_spend(spend_png, {policy: res["trace"]}, budget,
                   f"running ATP per request: {policy} on {res['recording']} (seed {seed})")
        console.print(f"wrote {spend_png}")
    if json_path:
        write_json(json_path, res)
        console.print(f"wrote {json_path}")
