"""``--db`` values: a file path or an SQLAlchemy URL, told apart without touching the disk.

A string that starts with ``scheme://`` or ``scheme+driver://`` (``postgresql+psycopg://``,
``sqlite:///file``) is a URL and never a file name; anything else is a path. Nothing here
imports SQLAlchemy: configuration validates ``--db`` with it cheaply, and the store
(:mod:`dreamroute.store.url`) opens the engine.
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
