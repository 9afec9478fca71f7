"""Store rows as the API shows them: secrets masked, progress from the latest report."""

from __future__ import annotations

from service.core.secrets import mask

from .repository import JobRow
from .schemas import JobOut, JobProgress, LastCheckpoint


def job_out(row: JobRow) -> JobOut:
    report = row.last_report
    checkpoint = (LastCheckpoint(step=row.last_checkpoint_step, written_at=row.last_checkpoint_at)
                  if row.last_checkpoint_step is not None else None)
    progress = JobProgress(
        step=report.step if report else 0, records=report.examples if report else 0,
        rejected=report.rejected if report else 0, lag=report.lag if report else None,
        lag_per_partition=dict(report.lag_per_partition) if report else {},
        records_per_s=report.records_per_s if report else None, last_report=report,
        last_report_at=row.last_report_at, last_checkpoint=checkpoint)
    return JobOut(id=row.id, state=row.state, reason=row.reason, spec=mask(row.spec), spec_hash=row.spec_hash,
                  runs=row.runs, created_at=row.created_at, updated_at=row.updated_at, ended_at=row.ended_at,
                  progress=progress)
