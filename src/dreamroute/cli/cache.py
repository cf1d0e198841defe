"""``dreamroute cache ls | stats | clear``: the reality cache's conversation KV states on disk."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import load_settings
from .common import ConfigOpt, console, err, handle_errors

cache_app = typer.Typer(help="The reality cache: conversation KV states on disk.", no_args_is_help=True)


@cache_app.command("ls")
@handle_errors
def cache_ls(config: Optional[Path] = ConfigOpt):
    """Stored conversation KV states, most recently used first."""
    from ..cache.reality import RealityCache
    s = load_settings(config)
    table = Table(title=f"reality cache {s.kv_dir}")
    for k in ("conversation", "tier", "model", "tokens", "MB", "last used"):
        table.add_column(k)
    for c in RealityCache(s.kv_dir, s.cache.max_bytes).entries():
        table.add_row(c.conversation, c.tier, c.identity[:12], str(c.n_tokens), f"{c.bytes / 1e6:.1f}",
                      datetime.datetime.fromtimestamp(c.last_used).isoformat(timespec="seconds"))
    console.print(table)


@cache_app.command("stats")
@handle_errors
def cache_stats(json_out: bool = typer.Option(False, "--json", help="Print JSON."), config: Optional[Path] = ConfigOpt):
    """Entries, bytes against the budget, tokens held, per tier."""
    from ..cache.reality import RealityCache
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
@handle_errors
def cache_clear(conversation: Optional[str] = typer.Option(None, help="Only this conversation's states."),
                config: Optional[Path] = ConfigOpt):
    """Delete stored KV states (all, or one conversation's)."""
    from ..cache.reality import RealityCache
    s = load_settings(config)
    n = RealityCache(s.kv_dir, s.cache.max_bytes).clear(conversation)
    if conversation is not None and n == 0:
        err.print(f"no stored state has conversation {escape(conversation)!r}; `dreamroute cache ls` lists them")
        raise typer.Exit(1)
    console.print(f"deleted {n} state(s) from {s.kv_dir}")
