"""What every command shares: the consoles, ``--config`` and ``--db``, the error handler that
turns dreamroute's named errors into one line and exit status 2, and opening the store."""

from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..config import Settings, load_settings
from ..config.db_url import is_server_url, is_sqlite_url
from ..errors import DreamrouteError, StoreError

console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", help="YAML config file (tiers:, router:, data_dir:).")
DbOpt = typer.Option(None, "--db", help="Store: an SQLite file path (default: <data_dir>/dreamroute.db) or an "
                     "SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host:5432/db (the postgres extra).")


def handle_errors(fn):
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


def settings_for(config: Optional[Path], db: Optional[str | Path]) -> Settings:
    """The settings of ``--config`` (None: defaults, environment) with ``--db`` applied."""
    return load_settings(config, db=db)


def existing_store(settings: Settings):
    """Open the store for a read-only command; an SQLite file that does not exist is an error,
    not created (a server URL is opened as it is: StoreError when it cannot be reached)."""
    from ..store.store import Store
    db = settings.db_path
    if not is_server_url(db):
        path = Path(db) if not is_sqlite_url(db) else sqlite_url_file(str(db))
        if path is not None and not path.exists():
            raise StoreError(f"no store at {path}; check --db (run or demo create one)")
    return Store(db, instance_id=settings.store.instance_id)


def sqlite_url_file(url: str) -> Optional[Path]:
    """The file an ``sqlite:///`` URL names (None: in memory)."""
    from sqlalchemy.engine import make_url
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None
