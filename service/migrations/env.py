"""Alembic's entry point. service.core.db.migrate hands it a connection that already holds the
migration lock (config.attributes["connection"]); without one, it connects to the config's
sqlalchemy.url (see service.core.db.alembic_config: writing or checking a migration)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from service.core.db import make_engine
from service.jobs.models import Base


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite alters a table by copying it; later migrations then work on both backends.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise SystemExit("the job store's migrations run online only (service.core.db.migrate)")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database to migrate: use service.core.db.alembic_config(url)")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            _run(connection)
    finally:
        engine.dispose()


_main()
