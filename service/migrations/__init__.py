"""Alembic migrations of the job store; run them with service.core.db.migrate (no alembic.ini)."""
