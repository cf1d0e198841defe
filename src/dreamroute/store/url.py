"""``--db`` values: a file path or an SQLAlchemy URL, told apart without touching the disk.

A string that starts with ``scheme://`` or ``scheme+driver://`` (``postgresql+psycopg://``,
``sqlite:///file``) is a URL and never a file name; anything else is a path. Nothing here
imports SQLAlchemy, so ``config`` can use it cheaply.
"""

from __future__ import annotations

import re
from pathlib import Path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9.\-]*(\+[A-Za-z0-9_.\-]+)?://")
_PASSWORD = re.compile(r"^([^:/]+://[^:/@]*:)[^@]*@")

#: the extra that installs the PostgreSQL driver (psycopg 3)
POSTGRES_EXTRA = "pip install 'dreamroute[postgres]'  (or: pip install 'psycopg[binary]>=3.1')"


def is_url(db: object) -> bool:
    """Whether ``db`` (a ``--db`` value) is an SQLAlchemy URL (``scheme://`` or
    ``scheme+driver://``) rather than a file path. A ``Path`` object is never a URL."""
    return isinstance(db, str) and _URL.match(db.strip()) is not None


def is_sqlite_url(db: object) -> bool:
    """Whether ``db`` is a ``sqlite://`` URL (a file or memory, handled as a path is)."""
    return is_url(db) and str(db).strip().lower().startswith(("sqlite:", "sqlite+"))


def is_server_url(db: object) -> bool:
    """Whether ``db`` is a URL of a database server (PostgreSQL, ...): one several routers share."""
    return is_url(db) and not is_sqlite_url(db)


def hide_password(db: object) -> str:
    """``db`` as text with a URL's password replaced by ``***`` (for messages and logs)."""
    text = str(db)
    return _PASSWORD.sub(r"\1***@", text) if is_url(text) else text


def normalise_url(url: str) -> str:
    """The URL SQLAlchemy is given: ``postgresql://`` and ``postgres://`` (no driver named) mean
    the psycopg 3 driver of the ``postgres`` extra, ``postgresql+psycopg://``; others unchanged."""
    url = url.strip()
    for bare in ("postgresql://", "postgres://"):
        if url.lower().startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def display(db: str | Path | None) -> str:
    """How a store is named in messages: the path, or the URL with its password hidden."""
    return ":memory:" if db is None else hide_password(db)


def server_engine(url: str):
    """An SQLAlchemy engine for a server URL (PostgreSQL), proven to connect.

    ``postgresql://`` means psycopg 3 (:func:`normalise_url`); connections are checked before
    use (``pool_pre_ping``) and give up connecting after 10 s.

    Raises:
        StoreError: another kind of server (only SQLite and PostgreSQL are supported), the
            driver is not installed (the message names the extra), or the server cannot be
            reached or refuses the login; the message names the URL with its password hidden.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    from dreamroute.errors import StoreError

    shown, url = hide_password(url), normalise_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StoreError(f"--db {shown} is not a database URL ({e}); give an SQLite file path or "
                         "postgresql+psycopg://user:password@host:5432/dbname") from e
    if parsed.get_backend_name() != "postgresql":
        raise StoreError(f"--db {shown}: only SQLite (a file path) and PostgreSQL "
                         "(postgresql+psycopg://user:password@host:5432/dbname) stores are supported")
    try:
        engine = create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except ImportError as e:
        raise StoreError(f"the PostgreSQL driver for --db {shown} is not installed ({e}); {POSTGRES_EXTRA}") from e
    except NoSuchModuleError as e:
        raise StoreError(f"--db {shown} names a driver SQLAlchemy does not know ({e}); use "
                         "postgresql+psycopg://... with the postgres extra: " + POSTGRES_EXTRA) from e
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        engine.dispose()
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if parsed.password:
            why = why.replace(parsed.password, "***")
        raise StoreError(f"cannot connect to the store {shown}: {why}; is the PostgreSQL server running and "
                         "reachable there, and are the user, password and database name right? Start it (for "
                         "the tests: bash scripts/pg_test_cluster.sh start) or choose another --db") from None
    return engine
