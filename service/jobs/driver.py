"""Jobs that outlive the API process: each runs in a detached, named Ray actor (a driver) that
submits it with workers.runner, keeps its reports in a sequence-numbered log and keeps its result
until the service has stored it and releases the actor.

The actor's code runs on Ray workers, so this module imports no web or database code, and Ray and
workers.runner (torch) only where they are used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, PositiveInt

from workers.errors import CicwStreamError, RayClusterError
from workers.report import JobReport, JobResult, JobStatus
from workers.spec import JobSpec

from ..core.errors import Conflict

log = logging.getLogger(__name__)

NAMESPACE = "cicw-stream"
# Reports a driver keeps for a service that has not polled them yet (the newest; metrics, not data).
MAX_DRIVER_REPORTS = 2000
# How often a driver moves the job's reports from its channel into its log.
PULL_EVERY_S = 0.2
# Threads answering calls: polls and a stop must be answered while nothing else blocks them.
DRIVER_CONCURRENCY = 8
# A driver that does not answer a call in this long is taken as unreachable.
CALL_TIMEOUT_S = 30.0
# release() waits this long for Ray to free the driver's name, so a resume can launch at once.
RELEASE_TIMEOUT_S = 15.0


class DriverExists(Conflict):
    """A live driver already runs (or holds the unreleased result of) this job id."""


class DriverReport(BaseModel):
    """One report of the job, numbered in the order the driver received it (from 1, per run)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seq: PositiveInt
    at: datetime  # when the driver received it (UTC)
    report: JobReport


class DriverSnapshot(BaseModel):
    """What a driver knows about its job: its status, the reports after the caller's ``since_seq``
    and, once the job ended, its result."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    job_id: str
    run: int
    status: JobStatus
    stop_reason: str | None  # the stop asked, if any (the first reason)
    reports: list[DriverReport]
    result: JobResult | None


def driver_name(job_id: str) -> str:
    """The Ray actor name of a job's driver."""
    return f"job-{job_id}"


class JobDriver:
    """Runs one job (the body of the detached Ray actor :class:`RayLauncher` creates; also usable
    as a plain object). The job runs on a thread of its own, so every method answers at once."""

    def __init__(self, spec: JobSpec, run: int, model_packages: tuple[str, ...] = ()) -> None:
        self._spec = spec
        self._run = run
        self._model_packages = model_packages
        self._lock = threading.Lock()
        self._log: deque[DriverReport] = deque(maxlen=MAX_DRIVER_REPORTS)
        self._seq = 0
        self._stop_reason: str | None = None
        self._handle: Any = None  # workers.runner.JobHandle once submit() returned
        self._result: JobResult | None = None
        self._thread = threading.Thread(target=self._drive, name=f"driver-{spec.job_id}", daemon=True)
        self._thread.start()

    def poll(self, since_seq: int = 0) -> DriverSnapshot:
        """The job's status, reports numbered above ``since_seq`` (those still kept) and result."""
        with self._lock:
            if self._result is not None:
                status: JobStatus = self._result.state
            else:
                status = "running" if self._seq else "pending"
            return DriverSnapshot(job_id=self._spec.job_id, run=self._run, status=status,
                                  stop_reason=self._stop_reason,
                                  reports=[r for r in self._log if r.seq > since_seq], result=self._result)

    def stop(self, reason: str) -> bool:
        """Ask the job to checkpoint and stop; remembered if the job has not started yet (the
        first reason is kept). No effect once the job ended. Returns True (the driver answered)."""
        with self._lock:
            if self._stop_reason is not None or self._result is not None:
                return True
            self._stop_reason = reason
            handle = self._handle
        if handle is not None:
            handle.stop(reason)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """True once the job ended (its result is kept), waiting up to ``timeout`` s."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the job's thread ---------------------------------------------------------------------

    def _drive(self) -> None:
        from workers import runner

        spec = self._spec
        try:
            handle = runner.submit(spec, model_packages=self._model_packages)
        except CicwStreamError as exc:  # preflight: bad model, broker or topic, checkpoint
            self._finish(self._failed(str(exc)))
            return
        except Exception as exc:  # a bug or a Ray failure: the job fails naming it, the actor lives on
            log.exception("submitting job %s failed", spec.job_id)
            self._finish(self._failed(f"the job could not be started: {type(exc).__name__}: {exc}"))
            return
        with self._lock:
            self._handle = handle
            reason = self._stop_reason
        if reason is not None:  # asked before the job existed
            handle.stop(reason)
        try:
            while not handle.done():
                self._append(handle.reports())
                time.sleep(PULL_EVERY_S)
            result = handle.wait()
        except Exception as exc:  # JobHandle.wait re-raises a crash of fit() on this side
            log.exception("job %s crashed in its driver", spec.job_id)
            result = self._failed(f"{type(exc).__name__}: {exc}")
        try:
            # The last reports (wait() drained the channel before closing it), before the result:
            # a poll that sees the result has seen every report.
            self._append(handle.reports())
            if result.state == "failed" and result.report is None:
                result = result.model_copy(update={"report": handle.latest_report()})
        except Exception:  # the channel went with a crash: what was read is all there is
            log.exception("cannot read the last reports of job %s", spec.job_id)
        self._finish(result)

    def _append(self, reports: list[JobReport]) -> None:
        if not reports:
            return
        now = datetime.now(UTC)
        with self._lock:
            for report in reports:
                self._seq += 1
                self._log.append(DriverReport(seq=self._seq, at=now, report=report))

    def _failed(self, error: str) -> JobResult:
        from workers.runner import failed_result

        try:
            return failed_result(self._spec, error)
        except Exception:  # the checkpoint lookup failed too: the error still reaches the service
            log.exception("cannot look up the checkpoints of job %s", self._spec.job_id)
            return JobResult(job_id=self._spec.job_id, state="failed", error=error)

    def _finish(self, result: JobResult) -> None:
        with self._lock:
            self._result = result


class RayLauncher:
    """Starts, watches, stops and releases job drivers on the Ray cluster this process joined
    (see service.core.ray_head.connect)."""

    def __init__(self, *, namespace: str = NAMESPACE, model_packages: tuple[str, ...] = ()) -> None:
        self.namespace = namespace
        self.model_packages = model_packages
        self._actor_class: Any = None

    def launch(self, spec: JobSpec, run: int) -> None:
        """Create the driver of ``spec`` (run number ``run``) and return without waiting for the
        job. Raises DriverExists if a driver of this job id is alive (not yet released)."""
        self.ready()
        if self._find(spec.job_id) is not None:
            raise DriverExists(self._exists_message(spec.job_id))
        try:
            # Detached: the driver outlives this process; its job's actors are its own and go with it.
            self._driver_class().options(name=driver_name(spec.job_id), namespace=self.namespace,
                                         lifetime="detached", max_concurrency=DRIVER_CONCURRENCY).remote(
                spec, run, self.model_packages)
        except ValueError as exc:  # the name was taken between the check and the creation
            if self._find(spec.job_id) is not None:
                raise DriverExists(self._exists_message(spec.job_id)) from exc
            raise

    def poll(self, job_id: str, since_seq: int) -> DriverSnapshot | None:
        """The driver's snapshot (reports numbered above ``since_seq``); None when there is no
        driver (released, never launched, or lost with its node)."""
        actor = self._find(job_id)
        if actor is None:
            return None
        snapshot: DriverSnapshot | None = self._call(actor.poll.remote(since_seq), job_id)
        return snapshot

    def stop(self, job_id: str, reason: str) -> bool:
        """Ask the job to checkpoint and stop; False when there is no driver."""
        actor = self._find(job_id)
        if actor is None:
            return False
        return self._call(actor.stop.remote(reason), job_id) is True  # None: it died meanwhile

    def release(self, job_id: str) -> None:
        """Kill the driver (once its result is stored: a running job dies with it) and wait until
        its name is free. No effect when there is none."""
        import ray

        actor = self._find(job_id)
        if actor is None:
            return
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while self._find(job_id) is not None:
            if time.monotonic() > deadline:
                raise RayClusterError(f"the driver of job {job_id!r} was killed but its name is still "
                                      f"held after {RELEASE_TIMEOUT_S:g} s")
            time.sleep(0.1)

    def ready(self) -> None:
        """Raise RayClusterError unless this process joined a Ray cluster that still answers."""
        import ray

        if not ray.is_initialized():
            raise RayClusterError("Ray is not connected: the service joins a cluster at startup")
        from workers.runner import probe_ray_address

        probe_ray_address(ray.get_runtime_context().gcs_address, timeout_s=5.0)

    # --- helpers --------------------------------------------------------------------------------

    def _driver_class(self) -> Any:
        import ray

        if self._actor_class is None:
            # num_cpus=0: the driver only waits; the job's workers hold the CPUs. No restarts: a
            # restarted driver would submit the job a second time.
            self._actor_class = ray.remote(num_cpus=0, max_restarts=0)(JobDriver)
        return self._actor_class

    def _find(self, job_id: str) -> Any:
        """The live driver's actor handle, or None."""
        import ray

        try:
            return ray.get_actor(driver_name(job_id), namespace=self.namespace)
        except ValueError:  # no actor of that name (or it died and its name was freed)
            return None

    def _call(self, ref: Any, job_id: str) -> Any:
        """The result of a call to a driver; None when the driver died meanwhile."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            return ray.get(ref, timeout=CALL_TIMEOUT_S)
        except RayActorError:  # killed, or lost with its node
            return None
        except GetTimeoutError as exc:
            raise RayClusterError(f"the driver of job {job_id!r} did not answer within {CALL_TIMEOUT_S:g} s") from exc

    def _exists_message(self, job_id: str) -> str:
        return (f"job {job_id!r} already has a driver (Ray actor {driver_name(job_id)!r} in namespace "
                f"{self.namespace!r}); it must end and be released first")
