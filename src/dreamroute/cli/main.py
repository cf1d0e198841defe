"""The ``dreamroute`` command line (typer): one module per command group, gathered here.
Every command takes ``--config`` and ``--db`` (:mod:`.common`)."""

from __future__ import annotations

import sys

import typer

from . import bench, cache, models, run, serve, trust
from .dream import dream_app

app = typer.Typer(help="Route each request to the cheapest local model that can be trusted with it.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(trust.ledger_app, name="ledger")
app.add_typer(models.models_app, name="models")
app.add_typer(cache.cache_app, name="cache")
for command in (run.run, run.demo, run.collect, run.simulate, bench.bench, trust.trust, models.doctor):
    app.command()(command)
app.add_typer(dream_app, name="dream")
app.command()(serve.serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
