"""The SQLAlchemy engine for a server store URL (PostgreSQL), proven to connect.

Telling a URL from a path, hiding its password and normalising its driver are in
:mod:`dreamroute.config.db_url`, which configuration uses without importing SQLAlchemy.
"""

from __future__ import annotations

from dreamroute.config.db_url import POSTGRES_EXTRA, hide_password, normalise_url


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
