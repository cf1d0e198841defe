"""The ``dreamroute`` command line: :data:`app` (typer), one module per command group."""

from .main import app

__all__ = ["app"]
