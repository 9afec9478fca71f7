"""The job store: jobs, their state machine's compare-and-set, and their reports.

Each method is one transaction. A state change locks the job's row first (SELECT ... FOR UPDATE
on PostgreSQL; SQLite transactions take the database's write lock when they begin, see
service.core.db), so two replicas polling the same job cannot both move it. Specs are stored
with their secrets sealed and handed back unsealed: the service relaunches jobs from them.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, overload

from pydantic import BaseModel, ConfigDict
from sqlalchemy import ColumnElement, Integer, Select, and_, delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from service.core.secrets import SecretSealer
from service.jobs.models import JobRecord, ReportRecord
from service.jobs.schemas import JobState
from workers.report import JobReport

TERMINAL_STATES = frozenset({JobState.STOPPED, JobState.FAILED, JobState.SUCCEEDED})
ACTIVE_STATES = frozenset(state for state in JobState if state.active)
_INSERT_CHUNK = 500  # rows per INSERT: well under SQLite's limit of bound parameters


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}")
        self.job_id = job_id


class JobExists(Conflict):
    code = "job_exists"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"a job {job_id!r} exists already (delete it first, or resume it)")
        self.job_id = job_id


class StateConflict(Conflict):
    """The job is not in a state the change allows; ``current`` is the state it is in."""

    code = "job_state_conflict"

    def __init__(self, job_id: str, current: JobState, expected: Collection[JobState] = ()) -> None:
        wanted = f"; this needs {' or '.join(sorted(expected))}" if expected else ""
        super().__init__(f"job {job_id!r} is {current}{wanted}")
        self.job_id = job_id
        self.current = current


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"

    def __init__(self, message: str = "the cursor is not one a listing of jobs returned") -> None:
        super().__init__(message, field="cursor")


class JobRow(BaseModel):
    """A stored job as the service uses it; ``spec`` holds the secrets in clear (mask it before
    showing it)."""

    model_config = ConfigDict(frozen=True)
    id: str
    spec: dict[str, Any]
    state: JobState
    reason: str | None
    stop_reason: str | None
    spec_hash: str
    runs: int
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    last_report: JobReport | None
    last_report_at: datetime | None
    last_seq: int
    last_checkpoint_step: int | None
    last_checkpoint_at: datetime | None


ReportIn = tuple[int, datetime, JobReport]  # (seq, at, report)


class JobRepository:
    """Jobs and their reports in the store behind ``session_factory``."""

    def __init__(self, session_factory: sessionmaker[Session], sealer: SecretSealer, *,
                 max_reports_per_job: int = 10_000, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if max_reports_per_job < 1:
            raise ServiceError(f"max_reports_per_job must be at least 1, got {max_reports_per_job}",
                               field="max_reports_per_job")
        self._sessions = session_factory
        self._sealer = sealer
        self._max_reports = max_reports_per_job
        self._clock = clock

    def create(self, job_id: str, spec: dict[str, Any], spec_hash: str) -> JobRow:
        """Store a new job, PENDING in its first run; JobExists if the id is taken (also when
        another replica creates it at the same moment)."""
        now = self._clock()
        record = JobRecord(id=job_id, spec_json=json.dumps(self._sealer.seal(spec)), spec_hash=spec_hash,
                           state=JobState.PENDING.value, runs=1, created_at=now, updated_at=now, last_seq=0)
        try:
            with self._sessions.begin() as session:
                session.add(record)
        except IntegrityError as exc:
            raise JobExists(job_id) from exc
        return self._row(record)

    def get(self, job_id: str) -> JobRow | None:
        """The job, or None."""
        with self._sessions.begin() as session:
            record = session.get(JobRecord, job_id)
            return None if record is None else self._row(record)

    def list(self, state: JobState | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[builtins.list[JobRow], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last).
        Jobs created after the first page never shift the later pages."""
        if limit < 1:
            raise InvalidRequest(f"limit must be at least 1, got {limit}", field="limit")
        query = select(JobRecord).order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).limit(limit + 1)
        if state is not None:
            query = query.where(JobRecord.state == state.value)
        if cursor is not None:
            created_at, job_id = _decode_cursor(cursor)
            query = query.where(or_(JobRecord.created_at < created_at,
                                    and_(JobRecord.created_at == created_at, JobRecord.id < job_id)))
        with self._sessions.begin() as session:
            records = session.scalars(query).all()
            rows = [self._row(record) for record in records[:limit]]
        more = len(records) > limit
        return rows, (_encode_cursor(rows[-1].created_at, rows[-1].id) if more else None)

    def transition(self, job_id: str, to: JobState, *, reason: str | None = None,
                   expected: Collection[JobState] | None = None, stop_reason: str | None = None) -> JobRow:
        """Move the job to ``to`` if its state is one of ``expected`` (any, when None), all in one
        transaction. ``reason`` replaces the stored one (None clears it); ``stop_reason`` is kept
        unless given. ``ended_at`` is set on entering STOPPED, FAILED or SUCCEEDED, else cleared."""
        with self._sessions.begin() as session:
            record = self._locked(session, job_id, expected)
            now = self._clock()
            record.state = to.value
            record.reason = reason
            if stop_reason is not None:
                record.stop_reason = stop_reason
            record.ended_at = now if to in TERMINAL_STATES else None
            record.updated_at = now
            return self._row(record)

    def start_run(self, job_id: str, *, expected: Collection[JobState]) -> JobRow:
        """Begin the job's next run (a resume): PENDING again, runs + 1, no report in this run yet,
        reason, stop_reason and ended_at cleared; only from a state in ``expected``."""
        with self._sessions.begin() as session:
            record = self._locked(session, job_id, expected)
            record.state = JobState.PENDING.value
            record.runs += 1
            record.last_seq = 0
            record.reason = record.stop_reason = record.ended_at = None
            record.updated_at = self._clock()
            return self._row(record)

    def add_reports(self, job_id: str, run: int, reports: Sequence[ReportIn]) -> int:
        """Store the reports of the job's current run newer than the last one stored, and make the
        newest the job's latest (and its latest checkpoint, if one says so); returns how many were
        new. Replays, and reports of an earlier run, store nothing. Trims the job's oldest reports
        beyond ``max_reports_per_job``."""
        with self._sessions.begin() as session:
            record = self._locked(session, job_id, None)
            if run != record.runs:
                return 0
            fresh = sorted({seq: (seq, at, report) for seq, at, report in reports if seq > record.last_seq}.values(),
                           key=lambda item: item[0])
            if not fresh:
                return 0
            added = self._insert_reports(session, job_id, run, fresh)
            self._summarise(record, fresh)
            self._trim(session, job_id)
            return added

    def series(self, job_id: str, max_points: int) -> tuple[builtins.list[tuple[datetime, int, JobReport]], int]:
        """The job's stored reports oldest first as (at, run, report), evenly thinned in SQL to at
        most ``max_points`` (the oldest and the newest always kept), and how many are stored."""
        if max_points < 1:
            raise InvalidRequest(f"max_points must be at least 1, got {max_points}", field="max_points")
        with self._sessions.begin() as session:
            if session.get(JobRecord, job_id) is None:
                raise JobNotFound(job_id)
            rows = session.execute(_thinned_reports(job_id, max_points)).all()
        total = rows[0].total if rows else 0
        return [(row.at, row.run, JobReport.model_validate_json(row.report_json)) for row in rows], total

    def delete(self, job_id: str) -> None:
        """Remove the job and (by cascade) its reports; JobNotFound if there is none."""
        with self._sessions.begin() as session:
            result = session.execute(delete(JobRecord).where(JobRecord.id == job_id))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise JobNotFound(job_id)

    def active(self) -> builtins.list[JobRow]:
        """Jobs a driver should be running (PENDING, RUNNING, STOPPING), oldest first."""
        query = select(JobRecord).where(JobRecord.state.in_([s.value for s in ACTIVE_STATES]))
        return self._all(query.order_by(JobRecord.created_at, JobRecord.id))

    def all_for_metrics(self) -> builtins.list[JobRow]:
        """Every job, oldest first (the metrics collector's view)."""
        return self._all(select(JobRecord).order_by(JobRecord.created_at, JobRecord.id))

    def _all(self, query: Select[JobRecord]) -> builtins.list[JobRow]:
        with self._sessions.begin() as session:
            return [self._row(record) for record in session.scalars(query)]

    @staticmethod
    def _locked(session: Session, job_id: str, expected: Collection[JobState] | None) -> JobRecord:
        record = session.scalars(select(JobRecord).where(JobRecord.id == job_id).with_for_update()).one_or_none()
        if record is None:
            raise JobNotFound(job_id)
        current = JobState(record.state)
        if expected is not None and current not in expected:
            raise StateConflict(job_id, current, expected)
        return record

    @staticmethod
    def _insert_reports(session: Session, job_id: str, run: int, fresh: Sequence[ReportIn]) -> int:
        values = [{"job_id": job_id, "run": run, "seq": seq, "at": at, "report_json": report.model_dump_json()}
                  for seq, at, report in fresh]
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        added = 0
        for start in range(0, len(values), _INSERT_CHUNK):
            # Another writer may have stored some of these seqs already (a replica that lost the row
            # lock race re-reading its driver's log): theirs stay, ours are skipped.
            statement = (insert(ReportRecord).values(values[start:start + _INSERT_CHUNK])
                         .on_conflict_do_nothing(index_elements=["job_id", "run", "seq"])
                         .returning(ReportRecord.id))  # counts inserted rows (rowcount is -1 with psycopg)
            added += len(session.execute(statement).all())
        return added

    def _summarise(self, record: JobRecord, fresh: Sequence[ReportIn]) -> None:
        seq, at, report = fresh[-1]
        record.last_seq = seq
        record.last_report_at = at
        record.last_report_json = report.model_dump_json()
        checkpoints = [(at, report) for _, at, report in fresh if report.checkpoint_step is not None]
        if checkpoints:
            record.last_checkpoint_at, newest = checkpoints[-1]
            record.last_checkpoint_step = newest.checkpoint_step
        record.updated_at = self._clock()

    def _trim(self, session: Session, job_id: str) -> None:
        of_job = ReportRecord.job_id == job_id
        excess = session.scalar(select(func.count()).select_from(ReportRecord).where(of_job)) or 0
        excess -= self._max_reports
        if excess > 0:
            oldest = (select(ReportRecord.id).where(of_job).order_by(ReportRecord.run, ReportRecord.seq)
                      .limit(excess).scalar_subquery())
            session.execute(delete(ReportRecord).where(ReportRecord.id.in_(oldest)))

    def _row(self, record: JobRecord) -> JobRow:
        return JobRow(
            id=record.id, spec=self._sealer.unseal(json.loads(record.spec_json)), state=JobState(record.state),
            reason=record.reason, stop_reason=record.stop_reason, spec_hash=record.spec_hash, runs=record.runs,
            created_at=_utc(record.created_at), updated_at=_utc(record.updated_at), ended_at=_utc(record.ended_at),
            last_report=(None if record.last_report_json is None
                         else JobReport.model_validate_json(record.last_report_json)),
            last_report_at=_utc(record.last_report_at), last_seq=record.last_seq,
            last_checkpoint_step=record.last_checkpoint_step, last_checkpoint_at=_utc(record.last_checkpoint_at))


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: None) -> None: ...
def _utc(value: datetime | None) -> datetime | None:
    # Values just written keep the caller's offset until read back; rows always show UTC.
    return None if value is None else value.astimezone(UTC)


def _thinned_reports(job_id: str, max_points: int) -> Select[Any]:
    """The reports at positions ceil(k (n-1) / (m-1)), k = 0..m-1, of the job's n reports ordered
    oldest first (all of them when n <= m): m evenly spaced points, the first and the last
    included. Position p is such a point iff it starts a new floor(p (m-1) / (n-1)) bucket."""
    numbered = select(
        ReportRecord.at, ReportRecord.run, ReportRecord.report_json,
        (func.row_number().over(order_by=(ReportRecord.run, ReportRecord.seq)) - 1).label("pos"),
        func.count().over().label("total"),
    ).where(ReportRecord.job_id == job_id).subquery()
    pos, total, m = numbered.c.pos, numbered.c.total, max_points
    if m == 1:
        keep = pos == total - 1
    else:
        # nullif guards n = 1 (then total <= m anyway); NULL compares as false.
        span = func.nullif(total - 1, 0)
        keep = or_(total <= m, pos == 0, _int_div(pos * (m - 1), span) > _int_div((pos - 1) * (m - 1), span))
    return (select(numbered.c.at, numbered.c.run, numbered.c.report_json, total).where(keep)
            .order_by(pos))


def _int_div(numerator: ColumnElement[int], denominator: ColumnElement[int]) -> ColumnElement[int]:
    # A plain "/" of two integers, which floors non-negative operands on SQLite and PostgreSQL alike.
    # SQLAlchemy's own // wraps it in FLOOR(), a function SQLite has only when built with its math functions.
    return numerator.op("/", return_type=Integer)(denominator)


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        when = datetime.fromisoformat(created_at)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidCursor() from exc
    if not isinstance(job_id, str) or when.tzinfo is None:
        raise InvalidCursor()
    return when, job_id
