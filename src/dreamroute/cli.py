"""The ``dreamroute`` command line (typer). Every command takes ``--config`` and ``--db``."""

from __future__ import annotations

import json
import sys
import tempfile
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Settings, load_settings
from .errors import DreamrouteError, StoreError

app = typer.Typer(help="Route each request to the cheapest local model that can be trusted with it.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
ledger_app = typer.Typer(help="The hash-chained ledger of trust changes.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights of the hierarchy.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(models_app, name="models")
cache_app = typer.Typer(help="The reality cache: conversation KV states on disk.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", help="YAML config file (tiers:, router:, data_dir:).")
DbOpt = typer.Option(None, "--db", help="Store: an SQLite file path (default: <data_dir>/dreamroute.db) or an "
                     "SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host:5432/db (the postgres extra).")


def _errors(fn):
    """Turn dreamroute's named errors into a one-line message and exit status 2."""
    @wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DreamrouteError as e:
            err.print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted; everything graded so far is stored (rerun to resume)[/]")
            raise typer.Exit(130) from None
    return wrapper


def _settings(config: Optional[Path], db: Optional[str | Path]) -> Settings:
    return load_settings(config, db=db)


def _existing_store(settings: Settings):
    """Open the store for a read-only command; an SQLite file that does not exist is an error,
    not created (a server URL is opened as it is: StoreError when it cannot be reached)."""
    from .store.store import Store
    from .store.url import is_server_url, is_sqlite_url
    db = settings.db_path
    if not is_server_url(db):
        path = Path(db) if not is_sqlite_url(db) else _sqlite_url_file(str(db))
        if path is not None and not path.exists():
            raise StoreError(f"no store at {path}; check --db (run or demo create one)")
    return Store(db, instance_id=settings.store.instance_id)


def _sqlite_url_file(url: str) -> Optional[Path]:
    from sqlalchemy.engine import make_url
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def _run_and_report(settings: Settings, spec: str, *, policy, budget, seed, limit, fresh, db, json_path,
                    title: str, max_tokens: int = 320) -> dict:
    from .eval.report import print_report
    from .eval.runner import run_workload, write_json
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


@app.command()
@_errors
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
    settings = _settings(config, db)
    if no_cache:
        settings = settings.model_copy(update={"cache": settings.cache.model_copy(update={"enabled": False})})
    _run_and_report(settings, workload, policy=policy, budget=budget, seed=seed, limit=limit, fresh=fresh,
                    db=db, json_path=json_path, title=f"run {policy}", max_tokens=max_tokens)


@app.command()
@_errors
def demo(n: int = typer.Option(40, min=1, help="Generated problems to route (levels 1-5 interleaved)."),
         budget: Optional[float] = typer.Option(90.0, min=0, help="Average ATP per request, J."),
         seed: int = typer.Option(0), json_path: Optional[Path] = typer.Option(None, "--json"),
         config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """The main job on the default hierarchy: route generated arithmetic word problems and show the trust learned.

    Starts from an empty store (a temporary one unless --db is given), so the
    trust shown is what this run learned.
    """
    from .store.url import hide_password
    settings = _settings(config, db)
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


@app.command()
@_errors
def collect(workload: str = typer.Argument(..., help="Workload to record (as for run)."),
            tiers: Optional[list[str]] = typer.Option(None, "--tiers", help="Tiers to run (default: all)."),
            limit: Optional[int] = typer.Option(None, min=0, help="Only the first N items (conversation turns count one each)."),
            out: Path = typer.Option(..., "--out", help="Recorded-outcome JSONL to write (resumable)."),
            config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Run every chosen tier on every item once and record the outcomes, for replay with `simulate`."""
    from .eval.collect import collect as do_collect
    settings = _settings(config, db)
    for t in tiers or []:
        settings.tier(t)
    res = do_collect(settings, workload, tiers=tiers, limit=limit, out=out, console=console)
    console.print(res)


@app.command()
@_errors
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
    from .eval.runner import write_json
    from .eval.simulate import print_simulation, simulate as do_simulate
    settings = _settings(config, None)
    res = do_simulate(settings, recorded, policy=policy, sweep=sweep, shuffle=shuffle, seeds=seeds, budget=budget,
                      seed=seed, db=db, console=console, budget_fraction=budget_fraction)
    budget = res["budget"]
    print_simulation(res, console)
    if plot:
        from .eval.plot import plot_cost_quality
        curves = {policy: [(p["cost_fraction"], p["accuracy"]) for p in res.get("points", [])]} if sweep else {}
        singles = {t: (v["cost_fraction"], v["accuracy"]) for t, v in res["singles"].items()}
        if not sweep:
            singles[policy] = (res["atp_joules"] / max(1e-12, res["top_atp_joules"]), res["accuracy"])
        plot_cost_quality(plot, curves, singles, (res["oracle"]["cost_fraction"], res["oracle"]["accuracy"]),
                          f"{policy} on {res['recording']}")
        console.print(f"wrote {plot}")
        from .eval.spend import plot_spend
        spend_png = plot.with_name(f"{plot.stem}_spend{plot.suffix or '.png'}")
        plot_spend(spend_png, {policy: res["trace"]}, budget,
                   f"running ATP per request: {policy} on {res['recording']} (seed {seed})")
        console.print(f"wrote {spend_png}")
    if json_path:
        write_json(json_path, res)
        console.print(f"wrote {json_path}")


@app.command()
@_errors
def bench(tier: Optional[list[str]] = typer.Option(None, "--tier", help="Tiers to bench (default: all llama tiers)."),
          repeats: int = typer.Option(3, help="Measure each speed this many times; keep the fastest."),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write a list with one object per tier."),
          kv: bool = typer.Option(False, "--kv", help="Measure the reality cache instead: follow-up TTFT cold vs "
                                  "restored at 500/2000/4000 tokens, warm handoff, bytes per cached token."),
          n_ctx: int = typer.Option(8192, min=512, help="With --kv: context size of the tiers measured."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Benchmark each tier (load, TTFT, prefill and decode tokens/s, RSS) and store the ATP calibration.

    With --kv, benchmark the reality cache on one tier (--tier, default tactical) and the
    handoff to the tier above it; nothing is stored.
    """
    from .backends import make_backend
    from .bench import bench_tier
    from .eval.runner import write_json
    from .store.store import Store
    settings = _settings(config, db)
    if kv:
        _bench_kv(settings, (tier or ["tactical"])[0], n_ctx, json_path)
        return
    names = tier or [t.name for t in settings.tiers if t.backend != "scripted"]
    rows = []
    with Store(settings.db_path, instance_id=settings.store.instance_id) as store:
        for name in names:
            t = settings.tier(name)
            console.print(f"benchmarking {name} ({t.model}) ...")
            backend = make_backend(t, settings)
            try:
                r = bench_tier(backend, t, repeats=repeats)
            finally:
                backend.close()
            store.save_calibration(r["identity"], name, r)
            rows.append(r)
    table = Table(title="dreamroute bench")
    keys = ["tier", "model", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "rss_mb"]
    for k in keys:
        table.add_column(k, justify="left" if k in ("tier", "model") else "right")
    for r in rows:
        table.add_row(*[f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys])
    console.print(table)
    if json_path:
        write_json(json_path, [{k: r[k] for k in keys} for r in rows])
        console.print(f"wrote {json_path}")


def _bench_kv(settings: Settings, name: str, n_ctx: int, json_path: Optional[Path]) -> None:
    from .backends import make_backend
    from .bench_kv import bench_kv
    from .eval.runner import write_json
    settings.tier(name)
    names = settings.tier_names
    up = names[names.index(name) + 1] if names.index(name) + 1 < len(names) else None
    backends = {}
    for t in settings.tiers:
        if t.name in (name, up):
            backends[t.name] = make_backend(t.model_copy(update={"n_ctx": max(t.n_ctx, n_ctx)}), settings)
    console.print(f"reality cache on {name} (handoff to {up or 'none'}), n_ctx {n_ctx} ...")
    try:
        res = bench_kv(backends, name, up)
    finally:
        for b in backends.values():
            b.close()
    table = Table(title=f"dreamroute bench --kv ({name})")
    for k in ("context tokens", "TTFT cold s", "TTFT restored s", "speedup", "state MB"):
        table.add_column(k, justify="right")
    for p in res["points"]:
        table.add_row(str(p["context_tokens"]), f"{p['ttft_cold_s']:.2f}", f"{p['ttft_restored_s']:.3f}",
                      f"{p['speedup']:.1f}x", f"{p['state_bytes'] / 1e6:.1f}")
    console.print(table)
    console.print(f"bytes per cached token {res.get('bytes_per_token', float('nan')):.0f} "
                  f"(theoretical KV {res['theoretical_bytes_per_token']})")
    if "handoff" in res:
        h = res["handoff"]
        console.print(f"handoff to {h['tier']} at {h['context_tokens']} tokens: TTFT cold {h['ttft_cold_s']:.2f} s, "
                      f"warm {h['ttft_warm_s']:.3f} s ({h['speedup']:.1f}x)")
    if json_path:
        write_json(json_path, res)
        console.print(f"wrote {json_path}")


@cache_app.command("ls")
@_errors
def cache_ls(config: Optional[Path] = ConfigOpt):
    """Stored conversation KV states, most recently used first."""
    from .cache.reality import RealityCache
    s = load_settings(config)
    table = Table(title=f"reality cache {s.kv_dir}")
    for k in ("conversation", "tier", "model", "tokens", "MB", "last used"):
        table.add_column(k)
    import datetime
    for c in RealityCache(s.kv_dir, s.cache.max_bytes).entries():
        table.add_row(c.conversation, c.tier, c.identity[:12], str(c.n_tokens), f"{c.bytes / 1e6:.1f}",
                      datetime.datetime.fromtimestamp(c.last_used).isoformat(timespec="seconds"))
    console.print(table)


@cache_app.command("stats")
@_errors
def cache_stats(json_out: bool = typer.Option(False, "--json", help="Print JSON."), config: Optional[Path] = ConfigOpt):
    """Entries, bytes against the budget, tokens held, per tier."""
    from .cache.reality import RealityCache
    s = load_settings(config)
    st = RealityCache(s.kv_dir, s.cache.max_bytes).stats()
    if json_out:
        print(json.dumps(st, indent=2))
        return
    console.print(f"{st['entries']} state(s), {st['bytes'] / 1e6:.1f} MB of {st['max_bytes'] / 1e6:.0f} MB, "
                  f"{st['tokens']} tokens ({s.kv_dir})")
    for t, d in st["by_tier"].items():
        console.print(f"  {t}: {d['entries']} state(s), {d['bytes'] / 1e6:.1f} MB")


@cache_app.command("clear")
@_errors
def cache_clear(conversation: Optional[str] = typer.Option(None, help="Only this conversation's states."),
                config: Optional[Path] = ConfigOpt):
    """Delete stored KV states (all, or one conversation's)."""
    from .cache.reality import RealityCache
    s = load_settings(config)
    n = RealityCache(s.kv_dir, s.cache.max_bytes).clear(conversation)
    if conversation is not None and n == 0:
        err.print(f"no stored state has conversation {escape(conversation)!r}; `dreamroute cache ls` lists them")
        raise typer.Exit(1)
    console.print(f"deleted {n} state(s) from {s.kv_dir}")


@app.command()
@_errors
def trust(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Show trust per model version × context."""
    from .eval.report import print_trust
    from .store.store import Store
    settings = _settings(config, db)
    with _existing_store(settings) as store:
        rows = [dict(tier=r.tier, model=r.model, context=r.context, trust=r.mean, alpha=r.alpha, beta=r.beta,
                     n=r.count) for r in store.trust_table()]
    if json_out:
        print(json.dumps(rows, indent=2))
    elif not rows:
        console.print(f"no trust recorded yet in {settings.db_display}; `dreamroute run` or `demo --db` records some")
    else:
        print_trust(rows, console)


@ledger_app.command("verify")
@_errors
def ledger_verify(config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Re-walk the hash chain; exit 1 and name each problem if any entry was edited or removed."""
    from .store.store import Store
    settings = _settings(config, db)
    with _existing_store(settings) as store:
        rep = store.verify_ledger()
    if rep.ok:
        console.print(f"[green]ledger ok[/]: {rep.entries} entries in {len(rep.chains)} chain(s), "
                      "each chain and the trust table agree")
        return
    for p in rep.problems:
        err.print(f"[red]✗[/] {escape(str(p))}")
    err.print(f"[bold red]ledger verification failed[/]: {len(rep.problems)} problem(s) in {rep.entries} entries")
    raise typer.Exit(1)


@ledger_app.command("show")
@_errors
def ledger_show(limit: int = typer.Option(20, help="Last N entries."),
                config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Show the last ledger entries."""
    from .store.store import Store
    settings = _settings(config, db)
    with _existing_store(settings) as store:
        entries = store.ledger_entries(limit)
    t = Table(title="ledger")
    for c in ("seq", "created_at", "entity", "action", "delta", "witnesses"):
        t.add_column(c)
    for e in entries:
        d = e["delta"]
        short = (f"trust {d['trust_before']:.3f}→{d['trust_after']:.3f}" if "trust_after" in d
                 else json.dumps(d)[:60])
        t.add_row(str(e["seq"]), e["created_at"][:19], e["entity"], e["action"], short, ",".join(e["witnesses"]))
    console.print(t)


@models_app.command("fetch")
@_errors
def models_fetch(config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Assemble every llama tier's GGUF from its source and check its sha256."""
    from .registry import fetch_all
    settings = _settings(config, db)
    for name, path in fetch_all(settings, progress=lambda m: console.print(m)):
        console.print(f"[green]ok[/] {name}: {path}")


@app.command()
@_errors
def doctor(json_out: bool = typer.Option(False, "--json", help="Print {\"checks\": [...]} as JSON."),
           no_prove: bool = typer.Option(False, "--no-prove", help="Skip running each tier (weights, store and directories only)."),
           config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Check this host: llama.cpp's build against what the CPU executes, each tier loads and answers, store, directories.

    Exit status 1 when a required check fails.
    """
    from .doctor import as_json, run_checks
    checks = run_checks(_settings(config, db), prove=not no_prove)
    if json_out:
        typer.echo(json.dumps(as_json(checks), indent=2))
    else:
        table = Table("check", "", "detail", show_lines=False)
        for c in checks:
            mark = "[green]ok[/]" if c.ok else ("[red]FAIL[/]" if c.required else "[yellow]missing[/]")
            table.add_row(escape(c.name), mark, escape(c.detail + (f"\n→ {c.hint}" if c.hint and not c.ok else "")))
        console.print(table)
    if any(c.required and not c.ok for c in checks):
        raise typer.Exit(1)


from .cli_dream import dream_app  # noqa: E402  (it imports the helpers above)
from .cli_serve import serve  # noqa: E402  (likewise)

app.add_typer(dream_app, name="dream")
app.command()(serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
