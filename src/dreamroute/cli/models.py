"""``dreamroute models fetch`` and ``dreamroute doctor``: the hierarchy's weights, assembled and
sha256-checked, and whether this host runs them (the checks are :mod:`.doctor`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import ConfigOpt, DbOpt, console, handle_errors, settings_for

models_app = typer.Typer(help="Model weights of the hierarchy.", no_args_is_help=True)


@models_app.command("fetch")
@handle_errors
def models_fetch(config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Assemble every llama tier's GGUF from its source and check its sha256."""
    from ..backends.registry import fetch_all
    settings = settings_for(config, db)
    for name, path in fetch_all(settings, progress=lambda m: console.print(m)):
        console.print(f"[green]ok[/] {name}: {path}")


@handle_errors
def doctor(json_out: bool = typer.Option(False, "--json", help="Print {\"checks\": [...]} as JSON."),
           no_prove: bool = typer.Option(False, "--no-prove", help="Skip running each tier (weights, store and directories only)."),
           config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Check this host: llama.cpp's build against what the CPU executes, each tier loads and answers, store, directories.

    Exit status 1 when a required check fails.
    """
    from .doctor import as_json, run_checks
    checks = run_checks(settings_for(config, db), prove=not no_prove)
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
