"""The job use cases: submit, stop, resume, delete, and keeping the store in step with the
drivers that run jobs on Ray (:meth:`JobService.sync`).

The store is the service's memory and the drivers are the truth while a job runs: every
replica (and a restarted service) polls the drivers of active jobs, stores their new reports
idempotently and moves each job's state with a compare-and-set, so replicas never fight and a
job that ended while no service ran is reconciled to how it really ended."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from workers.errors import CicwStreamError
from workers.report import JobReport, JobResult
from workers.spec import JobSpec

from .driver import DriverExists, DriverSnapshot
from .repository import JobNotFound, JobRepository, JobRow, StateConflict
from .schemas import JobState

log = logging.getLogger(__name__)

_ENDED: dict[str, JobState] = {"finished": JobState.SUCCEEDED, "stopped": JobState.STOPPED,
                               "failed": JobState.FAILED}
_RESUMABLE = (JobState.STOPPED, JobState.FAILED, JobState.SUCCEEDED)


class Launcher(Protocol):
    """Runs jobs somewhere that outlives this process (see service.jobs.driver.RayLauncher)."""

    def launch(self, spec: JobSpec, run: int) -> None: ...
    def poll(self, job_id: str, since_seq: int) -> DriverSnapshot | None: ...
    def stop(self, job_id: str, reason: str) -> bool: ...
    def release(self, job_id: str) -> None: ...
    def ready(self) -> None: ...


def spec_hash(spec: JobSpec) -> str:
    """sha256 of the spec as canonical JSON (secrets included: the hash never shows them)."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobService:
    """What the routes call. Thread-safe as far as the repository and launcher are."""

    def __init__(self, repo: JobRepository, launcher: Launcher, *, lost_driver_grace_s: float = 30.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.repo = repo
        self.launcher = launcher
        self._grace_s = lost_driver_grace_s
        self._clock = clock

    # --- use cases -------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobRow:
        """Store the job (JobExists if its id is taken) and start its driver."""
        row = self.repo.create(spec.job_id, spec.model_dump(mode="json"), spec_hash(spec))
        return self._launch(row, spec)

    def get(self, job_id: str) -> JobRow:
        row = self.repo.get(job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row

    def spec_of(self, row: JobRow) -> JobSpec:
        return JobSpec.model_validate(row.spec)

    def latest_training_report(self, row: JobRow, *, look_back: int = 200) -> JobReport | None:
        """The newest report that covers training steps (a job's final report covers none, so
        its weight statistics and prequential accuracy are empty): what a model card shows."""
        if row.last_report is None or row.last_report.cicw is not None:
            return row.last_report
        points, _ = self.repo.series(row.id, look_back)
        trained = [report for _at, _run, report in points if report.cicw is not None]
        if not trained:
            return row.last_report
        # Counters and evaluation from the last report, the step metrics from the last step's.
        return trained[-1].model_copy(update={k: getattr(row.last_report, k) for k in (
            "step", "examples", "rejected", "eval_accuracy", "eval_loss", "eval_examples", "checkpoint_step")
            if getattr(row.last_report, k) is not None})

    def stop(self, job_id: str, reason: str) -> JobRow:
        """Ask a PENDING or RUNNING job to checkpoint and stop (STOPPING until it did; asking a
        STOPPING job again changes nothing). StateConflict for a job that is not running."""
        row = self.get(job_id)
        if row.state != JobState.STOPPING:
            row = self.repo.transition(job_id, JobState.STOPPING, expected=(JobState.PENDING, JobState.RUNNING),
                                       stop_reason=reason)
        if not self.launcher.stop(job_id, row.stop_reason or reason):
            self._sync_job(row)  # the driver is gone: reconcile now rather than at the next poll
            return self.get(job_id)
        return row

    def resume(self, job_id: str) -> JobRow:
        """Run an ended job again under its id: its workers continue from its latest checkpoint,
        offsets included, so every record reaches the model exactly once across the stop."""
        row = self.get(job_id)
        if row.state.active:
            raise StateConflict(job_id, row.state, _RESUMABLE)
        self.launcher.release(job_id)  # the previous run's driver, if a replica had not yet
        row = self.repo.start_run(job_id, expected=_RESUMABLE)
        return self._launch(row, self.spec_of(row))

    def delete(self, job_id: str, *, purge: Callable[[JobSpec], None] | None = None) -> JobRow:
        """Forget an ended job (StateConflict while it runs); ``purge`` deletes its checkpoints
        first (if it refuses, the job stays)."""
        row = self.get(job_id)
        if row.state.active:
            raise StateConflict(job_id, row.state, _RESUMABLE)
        if purge is not None:
            purge(self.spec_of(row))
        self.launcher.release(job_id)
        self.repo.delete(job_id)
        return row

    def _launch(self, row: JobRow, spec: JobSpec) -> JobRow:
        try:
            self.launcher.launch(spec, row.runs)
        except DriverExists:
            raise
        except CicwStreamError as exc:  # Ray unreachable: the job is failed with the reason, not lost
            log.warning("job %s could not be launched: %s", row.id, exc)
            return self.repo.transition(row.id, JobState.FAILED, reason=f"launch failed: {exc}",
                                        expected=(JobState.PENDING,))
        return row

    # --- reconciliation ----------------------------------------------------------------------
    def sync(self) -> int:
        """Poll the driver of every active job once; returns how many jobs changed state."""
        changed = 0
        for row in self.repo.active():
            try:
                changed += self._sync_job(row)
            except StateConflict:
                pass  # another replica moved it first
            except CicwStreamError as exc:
                log.warning("cannot sync job %s: %s", row.id, exc)
        return changed

    def _sync_job(self, row: JobRow) -> bool:
        snap = self.launcher.poll(row.id, row.last_seq)
        if snap is None or snap.run != row.runs:
            return self._driver_missing(row)
        if snap.reports:
            self.repo.add_reports(row.id, snap.run, [(r.seq, r.at, r.report) for r in snap.reports])
        if snap.result is not None:
            self._finish(row, snap.result)
            return True
        if row.state == JobState.PENDING and snap.status == "running":
            self.repo.transition(row.id, JobState.RUNNING, expected=(JobState.PENDING,))
            return True
        if row.state == JobState.STOPPING and snap.stop_reason is None:
            # A stop asked while the driver was unreachable (or on another replica) is sent again.
            self.launcher.stop(row.id, row.stop_reason or "stopped over REST")
        return False

    def _finish(self, row: JobRow, result: JobResult) -> None:
        state = _ENDED[result.state]
        reason = result.error if state == JobState.FAILED else (
            result.report.stopped if result.report is not None and state == JobState.STOPPED else None)
        current = self.get(row.id)
        if result.report is not None and (current.last_report is None or not current.last_report.final):
            # The final report reaches the driver with the result only when the job's channel went
            # before it was read (a failure); then it is stored as the last one.
            self.repo.add_reports(row.id, row.runs, [(current.last_seq + 1, self._clock(), result.report)])
        self.repo.transition(row.id, state, reason=reason, expected=(row.state,))
        self.launcher.release(row.id)

    def _driver_missing(self, row: JobRow) -> bool:
        age = (self._clock() - row.updated_at).total_seconds()
        if age < self._grace_s:
            return False  # just launched, or the cluster is restarting: wait before calling it lost
        self.repo.transition(row.id, JobState.FAILED, expected=(row.state,),
                             reason="the job's driver is gone (its Ray cluster or node restarted); "
                                    "resume it to continue from its latest checkpoint")
        return True
