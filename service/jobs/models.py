"""The job store's tables: one row per job (``jobs``) and its stored reports (``job_reports``).

JSON bodies are kept as text (the spec with its secrets sealed, the reports as JobReport JSON):
the store never queries inside them, and text reads the same on SQLite and PostgreSQL.
service/migrations/versions creates these tables; a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can name what they alter on either backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend. SQLite stores no offset, so values are
    converted to UTC on the way in and marked UTC on the way out; naive values are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the job store: pass an aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobRecord(Base):
    """A job: its spec (secrets sealed), state, and a summary of its latest report."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),  # newest-first keyset pagination
        Index("ix_jobs_state", "state"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))  # a service.jobs.schemas.JobState value
    reason: Mapped[str | None] = mapped_column(Text)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    runs: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_report_json: Mapped[str | None] = mapped_column(Text)
    last_report_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # seq of the last report stored for the current run (0: none yet); reports at or below it are replays.
    last_seq: Mapped[int] = mapped_column(Integer)
    last_checkpoint_step: Mapped[int | None] = mapped_column(BigInteger)
    last_checkpoint_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ReportRecord(Base):
    """One report of one run of a job, numbered by its driver (seq from 1 in each run)."""

    __tablename__ = "job_reports"
    __table_args__ = (UniqueConstraint("job_id", "run", "seq"),)

    # BIGINT on PostgreSQL; on SQLite only INTEGER PRIMARY KEY autoincrements.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    report_json: Mapped[str] = mapped_column(Text)
