"""The job store's database: an engine for SQLite (one replica, the default) or PostgreSQL
(several replicas), its Alembic migrations, and a session factory.

SQLite transactions all begin IMMEDIATE (they take the write lock at once): a transaction that
reads and then writes (compare-and-set, report ingestion) would otherwise fail with "database is
locked" when another connection wrote in between, instead of waiting out the busy timeout. The
price: read-only transactions queue behind a writer too, for the milliseconds it holds the lock.
Needs SQLite 3.35 or newer (RETURNING; window functions since 3.25).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from service.core.errors import ServiceError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock key serialising concurrent migrations (any constant shared by replicas).
_MIGRATION_LOCK_KEY = 0x43494357_0001  # "CICW", 1


class DatabaseUrlError(ServiceError):
    """The store's URL names no database this service supports."""

    code = "invalid_database_url"


class DatabaseUnavailable(ServiceError):
    """The store does not answer (readiness fails)."""

    status_code = 503
    code = "database_unavailable"


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` (the file's folder is created) or ``postgresql://...``
    (run through psycopg 3); raises DatabaseUrlError for anything else."""
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    return create_engine(parsed, pool_pre_ping=True)


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"not a database URL: {url!r} ({exc})", field="database_url") from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("", "pysqlite"):
        return parsed
    if backend in ("postgresql", "postgres") and driver in ("", "psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise DatabaseUrlError(f"unsupported database {parsed.drivername!r}: use sqlite:///path/to/file.db or "
                           "postgresql://user@host/db (run through psycopg 3)", field="database_url")


def _sqlite_engine(url: URL) -> Engine:
    memory = url.database in (None, "", ":memory:")
    if not memory:
        Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    # One shared connection for an in-memory database: each new connection would be a new, empty one.
    extra: dict[str, Any] = {"poolclass": StaticPool} if memory else {}
    engine = create_engine(url, connect_args={"check_same_thread": False,
                                              "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **extra)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN (deferred, only before writes) is switched off: _sqlite_on_begin
    # issues one at the start of every SQLAlchemy transaction instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _enable_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE of a job's reports
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint of the WAL; safe with WAL
    cursor.close()


def _enable_wal(cursor: Any) -> None:
    # Two processes opening a new database both try to switch it to WAL; SQLite answers one of them
    # "database is locked" at once, without waiting out the busy timeout (a deadlock otherwise).
    # WAL is a property of the file: once set, later connections find it so.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_on_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Upgrade the store's schema to the newest migration. Safe to call from several replicas at
    once: PostgreSQL serialises them on an advisory lock, SQLite on its write lock."""
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction ends: the next replica then finds the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for the store's migrations (there is no alembic.ini). With a URL,
    Alembic's commands connect to it themselves, e.g. to write the next migration:
    ``command.revision(alembic_config("sqlite:///dev.db"), "add x", autogenerate=True)``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % in a password is written %%.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (the repository returns copies)."""
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    """Raise DatabaseUnavailable unless the database answers a query."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(f"the job store does not answer: {exc.__class__.__name__}: {exc}") from exc
