"""An in-memory Launcher for tests of the API's logic (routes, states, errors): drivers whose
reports and results the test sets. Tests through real Ray use service.jobs.driver.RayLauncher."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.jobs.driver import DriverExists, DriverReport, DriverSnapshot
from workers.report import JobReport, JobResult
from workers.spec import JobSpec


@dataclass
class FakeDriver:
    spec: JobSpec
    run: int
    reports: list[DriverReport] = field(default_factory=list)
    stop_reason: str | None = None
    result: JobResult | None = None


class FakeLauncher:
    def __init__(self) -> None:
        self.drivers: dict[str, FakeDriver] = {}
        self.launched: list[tuple[str, int]] = []
        self.fail_launch: Exception | None = None
        self.ray_down = False
        self._lock = threading.Lock()

    def launch(self, spec: JobSpec, run: int) -> None:
        with self._lock:
            if self.fail_launch is not None:
                raise self.fail_launch
            if spec.job_id in self.drivers:
                raise DriverExists(f"job {spec.job_id!r} already has a driver")
            self.drivers[spec.job_id] = FakeDriver(spec, run)
            self.launched.append((spec.job_id, run))

    def poll(self, job_id: str, since_seq: int) -> DriverSnapshot | None:
        with self._lock:
            d = self.drivers.get(job_id)
            if d is None:
                return None
            status = d.result.state if d.result else ("running" if d.reports else "pending")
            return DriverSnapshot(job_id=job_id, run=d.run, status=status, stop_reason=d.stop_reason,
                                  reports=[r for r in d.reports if r.seq > since_seq], result=d.result)

    def stop(self, job_id: str, reason: str) -> bool:
        with self._lock:
            d = self.drivers.get(job_id)
            if d is None:
                return False
            d.stop_reason = d.stop_reason or reason
            return True

    def release(self, job_id: str) -> None:
        with self._lock:
            self.drivers.pop(job_id, None)

    def ready(self) -> None:
        from workers.errors import RayClusterError

        if self.ray_down:
            raise RayClusterError("Ray at 127.0.0.1:1 is unreachable (fake)")

    # --- what a test makes the job do --------------------------------------------------------
    def report(self, job_id: str, report: JobReport) -> None:
        with self._lock:
            d = self.drivers[job_id]
            d.reports.append(DriverReport(seq=len(d.reports) + 1, at=datetime.now(UTC), report=report))

    def end(self, job_id: str, result: JobResult) -> None:
        with self._lock:
            self.drivers[job_id].result = result
