"""``dreamroute dream``: run or resume a consolidation cycle, show its plan, roll a promotion back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import ConfigOpt, DbOpt, console, existing_store, handle_errors, settings_for

dream_app = typer.Typer(help="DREAM: distill what bigger tiers answered well into a smaller tier (LoRA), "
                             "validate, then promote.", invoke_without_command=True)


def _dreamer(config, db, student, teacher, sets=None):
    from ..dream.dream import Dreamer
    from ..dream.dream_config import DreamConfig
    settings = settings_for(config, db)
    cfg = DreamConfig.from_sources(settings.dream, sets)  # validate before opening anything
    store = existing_store(settings)  # a cycle replays stored experiences: no store, nothing to learn
    return Dreamer(settings, store, cfg, student=student, teacher=teacher, console=console), store


@dream_app.callback()
@handle_errors
def dream(ctx: typer.Context,
          student: str = typer.Option("tactical", help="Tier that learns."),
          teacher: str = typer.Option("specialized", help="Bigger tier whose correct answers it learns from."),
          max_examples: Optional[int] = typer.Option(None, min=1, help="Most training examples (most useful first)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be used."),
          json_path: Optional[Path] = typer.Option(None, "--json", help="Write the cycle's report as JSON."),
          sets: Optional[list[str]] = typer.Option(None, "--set", help="A DREAM setting, KEY=VALUE (repeatable; "
                                                   "e.g. --set epochs=1); also `dream:` in the config file."),
          config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Run one consolidation cycle (or resume the one that was stopped) and print a before/after report."""
    if ctx.invoked_subcommand is not None:
        return
    from ..eval.runner import write_json
    d, store = _dreamer(config, db, student, teacher, sets)
    try:
        rep = d.run(max_examples=max_examples, dry_run=dry_run)
    finally:
        store.close()
        for b in d.backends.values():
            b.close()
    table = Table(title=f"DREAM {teacher} → {student}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    if not dry_run:
        for k in ("heldout_accuracy", "regression_accuracy", "perplexity"):
            v = rep[k]
            table.add_row(k, *(f"{x:.3f}" if isinstance(x, float) else "-" for x in (v["before"], v["after"])))
        console.print(table)
        console.print(f"examples {rep['examples']}, steps {rep['steps']}, {rep['wall_s']:.0f} s; "
                      f"{'PROMOTED' if rep['promoted'] else 'rejected'} (version {rep['version']})"
                      + (f": {'; '.join(rep['reasons'])}" if rep["reasons"] else ""))
    else:
        console.print(rep)
    if json_path:
        write_json(json_path, rep)


@dream_app.command("plan")
@handle_errors
def dream_plan(student: str = typer.Option("tactical"), teacher: str = typer.Option("specialized"),
               max_examples: Optional[int] = typer.Option(None, min=1), limit: int = typer.Option(10, help="Items shown."),
               config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Show the replay set a cycle would use: counts, then the first items of each split."""
    d, store = _dreamer(config, db, student, teacher)
    try:
        plan = d.plan(max_examples)
    finally:
        store.close()
    console.print(plan.summary())
    for name, items in (("train", plan.train), ("held-out", plan.heldout)):
        t = Table(title=f"{name} ({len(items)})")
        for c in ("student failed", "salience", "prompt"):
            t.add_column(c)
        for it in items[:limit]:
            t.add_row("yes" if it.student_failed else "", f"{it.salience:.2f}", it.prompt[:90])
        console.print(t)


@dream_app.command("rollback")
@handle_errors
def dream_rollback(tier: str = typer.Option("tactical", help="Tier whose DREAM version is withdrawn."),
                   config: Optional[Path] = ConfigOpt, db: Optional[str] = DbOpt):
    """Serve the version the tier's active DREAM version was trained from (ledgered)."""
    from ..dream.dream import rollback
    settings = settings_for(config, db)
    with existing_store(settings) as store:
        vid = rollback(store, tier)
    console.print(f"tier {tier} now serves version {vid}")
