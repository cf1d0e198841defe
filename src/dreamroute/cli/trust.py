"""``dreamroute trust`` and ``dreamroute ledger verify | show``: trust per model version ×
context, and the hash-chained ledger of every change to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import ConfigOpt, DbOpt, console, err, existing_store, handle_errors, settings_for

ledger_app = typer.Typer(help="The hash-chained ledger of trust changes.", no_args_is_help=True)


@handle_errors
def trust(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Show trust per model version × context."""
    from ..eval.report import print_trust
    settings = settings_for(config, db)
    with existing_store(settings) as store:
        rows = [dict(tier=r.tier, model=r.model, context=r.context, trust=r.mean, alpha=r.alpha, beta=r.beta,
                     n=r.count) for r in store.trust_table()]
    if json_out:
        print(json.dumps(rows, indent=2))
    elif not rows:
        console.print(f"no trust recorded yet in {settings.db_display}; `dreamroute run` or `demo --db` records some")
    else:
        print_trust(rows, console)


@ledger_app.command("verify")
@handle_errors
def ledger_verify(config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Re-walk the hash chain; exit 1 and name each problem if any entry was edited or removed."""
    settings = settings_for(config, db)
    with existing_store(settings) as store:
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
@handle_errors
def ledger_show(limit: int = typer.Option(20, help="Last N entries."),
                config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Show the last ledger entries."""
    settings = settings_for(config, db)
    with existing_store(settings) as store:
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
