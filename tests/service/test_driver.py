"""Job drivers: the JobDriver's bookkeeping against a fake job handle (report numbering and bound,
a stop asked before the job exists, a crash on the driver's side), then detached drivers on a real
`ray start` head with real jobs on the embedded broker: a job launched by a process that exits
runs to its end, a stop checkpoints, a preflight failure is a failed result kept until released,
and a second launch of a live id is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer

from service.core.errors import Conflict
from service.core.ray_head import connect, ensure_local_head, head_temp_dir, stop_local_head
from service.jobs.driver import MAX_DRIVER_REPORTS, DriverExists, DriverReport, DriverSnapshot, JobDriver, RayLauncher
from workers import runner
from workers.errors import SourceClientError
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.topics import ensure_topic
from workers.report import JobReport, JobResult
from workers.spec import JobSpec
from workers.train.checkpoints import load_state

# A job on this 2-CPU head takes seconds to start; nothing here should wait longer than this.
JOB_TIMEOUT_S = 120.0


def _spec(bootstrap: str, topic: str, tmp_path: Path, **source: Any) -> JobSpec:
    return JobSpec.model_validate({
        "job_id": "drv-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "batch_size": 16, "max_wait_s": 0.05,
                   "health_check_s": 0.3, "metadata_timeout_s": 1.0, **source},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "cicw": {"method": "cicw", "burn_in_steps": 2, "anneal_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": 1000, "keep": 2, "storage_path": str(tmp_path / "ckpt")},
        "report_every_steps": 2, "max_failures": 0,
    })


def _wait_until(what: str, check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.02)
    return value


# --- the driver's bookkeeping, against a fake handle -----------------------------------------------


class FakeHandle:
    """A JobHandle's surface, driven by the test: reports are pushed, the job is ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unread: list[JobReport] = []
        self._latest: JobReport | None = None
        self._result: JobResult | None = None
        self._crash: BaseException | None = None
        self._ended = threading.Event()
        self.stops: list[str] = []

    def push(self, reports: list[JobReport]) -> None:
        with self._lock:
            self._unread.extend(reports)
            self._latest = reports[-1]

    def end(self, result: JobResult | None = None, crash: BaseException | None = None) -> None:
        self._result, self._crash = result, crash
        self._ended.set()

    def done(self) -> bool:
        return self._ended.is_set()

    def reports(self) -> list[JobReport]:
        with self._lock:
            out, self._unread = self._unread, []
            return out

    def latest_report(self) -> JobReport | None:
        return self._latest

    def stop(self, reason: str) -> None:
        self.stops.append(reason)

    def wait(self, timeout: float | None = None) -> JobResult:
        if self._crash is not None:
            raise self._crash
        assert self._result is not None
        return self._result


def _report(step: int, **fields: Any) -> JobReport:
    return JobReport(step=step, examples=16 * step, **fields)


@pytest.fixture
def fake_submit(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHandle, threading.Event]]:
    """runner.submit returns a FakeHandle once the test sets the event (the job 'starts')."""
    handle, started = FakeHandle(), threading.Event()

    def submit(spec: JobSpec, *, model_packages: tuple[str, ...] = ()) -> FakeHandle:
        assert started.wait(30), "the test never started the job"
        return handle

    monkeypatch.setattr(runner, "submit", submit)
    yield handle, started
    started.set()
    handle.end(crash=RuntimeError("test over"))


def _offline_spec(tmp_path: Path) -> JobSpec:
    return _spec("127.0.0.1:9", "t", tmp_path)


def test_reports_are_numbered_from_one_and_only_the_newest_are_kept(
        fake_submit: tuple[FakeHandle, threading.Event], tmp_path: Path) -> None:
    handle, started = fake_submit
    spec = _offline_spec(tmp_path)
    driver = JobDriver(spec, run=3)
    assert driver.poll().status == "pending" and driver.poll().reports == []
    started.set()
    handle.push([_report(1)])
    first = _wait_until("the first report", lambda: driver.poll(0).reports)
    assert [r.seq for r in first] == [1] and first[0].report == _report(1) and driver.poll().status == "running"

    total = MAX_DRIVER_REPORTS + 500
    for start in range(2, total + 1, 250):
        handle.push([_report(s) for s in range(start, min(start + 250, total + 1))])
    final = JobResult(job_id=spec.job_id, state="finished", report=_report(total, final=True))
    handle.end(final)
    assert driver.wait(10)
    snap = driver.poll(0)
    assert snap.status == "finished" and snap.result == final and snap.run == 3 and snap.job_id == spec.job_id
    # The oldest were dropped; the numbers still say which report each is.
    assert [r.seq for r in snap.reports] == list(range(total - MAX_DRIVER_REPORTS + 1, total + 1))
    assert [r.report.step for r in snap.reports] == [r.seq for r in snap.reports]
    assert [r.seq for r in driver.poll(total - 3).reports] == [total - 2, total - 1, total]
    assert driver.poll(total).reports == []


def test_a_stop_asked_before_the_job_exists_reaches_it_when_it_starts(
        fake_submit: tuple[FakeHandle, threading.Event], tmp_path: Path) -> None:
    handle, started = fake_submit
    spec = _offline_spec(tmp_path)
    driver = JobDriver(spec, run=1)
    assert driver.stop("asked early") is True
    assert driver.stop("asked again") is True  # the first reason is kept
    snap = driver.poll()
    assert snap.status == "pending" and snap.stop_reason == "asked early" and snap.result is None
    assert handle.stops == []
    started.set()
    _wait_until("the stop to reach the job", lambda: handle.stops)
    stopped = JobResult(job_id=spec.job_id, state="stopped", report=_report(2, final=True, stopped="asked early"))
    handle.end(stopped)
    assert driver.wait(10)
    assert handle.stops == ["asked early"] and driver.poll().result == stopped
    assert driver.poll().status == "stopped"
    driver.stop("after the end")  # no effect on an ended job
    assert handle.stops == ["asked early"] and driver.poll().stop_reason == "asked early"


def test_a_crash_on_the_drivers_side_is_a_failed_result_naming_it(
        fake_submit: tuple[FakeHandle, threading.Event], tmp_path: Path) -> None:
    handle, started = fake_submit
    driver = JobDriver(_offline_spec(tmp_path), run=1)
    started.set()
    handle.push([_report(4)])
    handle.end(crash=RuntimeError("fit() broke on the driver"))
    assert driver.wait(30)
    result = driver.poll().result
    assert result is not None and result.state == "failed" and driver.poll().status == "failed"
    assert result.error == "RuntimeError: fit() broke on the driver"
    assert result.report == _report(4)  # the last report the job sent
    assert [r.seq for r in driver.poll().reports] == [1]


def test_a_submit_error_is_a_failed_result_not_a_dead_driver(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    def submit(spec: JobSpec, *, model_packages: tuple[str, ...] = ()) -> None:
        raise SourceClientError("topic 't' does not exist")

    monkeypatch.setattr(runner, "submit", submit)
    driver = JobDriver(_offline_spec(tmp_path), run=1)
    assert driver.wait(60)
    result = driver.poll().result
    assert result is not None and result.state == "failed" and result.error == "topic 't' does not exist"
    assert result.checkpoint is None  # none was ever written


def test_the_drivers_module_imports_no_web_database_ray_or_torch_code() -> None:
    heavy = ("fastapi", "sqlalchemy", "ray", "torch")
    code = (f"import sys, service.jobs.driver; print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_snapshots_and_conflicts_are_typed() -> None:
    exc = DriverExists("job 'x' already has a driver")
    assert isinstance(exc, Conflict) and exc.status_code == 409 and exc.code == "conflict"
    with pytest.raises(Exception, match="frozen"):
        DriverSnapshot(job_id="x", run=1, status="pending", stop_reason=None, reports=[], result=None).run = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="seq"):
        DriverReport(seq=0, at="2026-01-01T00:00:00Z", report=_report(1))  # type: ignore[arg-type]


# --- detached drivers on a real Ray head, with real jobs ------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `ray start` head of this module's own (2 CPUs: one job's worker and room for a second),
    joined by the test process; stopped, with only its own processes, at the end."""
    import ray

    state_dir = tmp_path_factory.mktemp("ray-state")
    address = ensure_local_head(state_dir, num_cpus=2)
    ray.shutdown()  # a Ray another module left initialised would not be this head
    try:
        connect(address)
        yield address
    finally:
        ray.shutdown()
        stop_local_head(state_dir)
        shutil.rmtree(head_temp_dir(state_dir), ignore_errors=True)


def _send(bootstrap: str, topic: str, n: int, *, seed: int = 0) -> None:
    """n JSON records of 3 well separated classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)) + 3 * np.eye(3, 8)[y]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, json.dumps({"x": x[i].tolist(), "y": int(y[i]), "id": str(i)}).encode())
    assert producer.flush(10) == 0


def _topic(broker: EmbeddedBroker, n: int) -> str:
    topic = f"drv-{uuid.uuid4().hex[:8]}"
    ensure_topic(broker.bootstrap, topic, 1)
    _send(broker.bootstrap, topic, n)
    return topic


def _follow(launcher: RayLauncher, job_id: str, *, until: Callable[[DriverSnapshot], bool],
            reports: list[DriverReport]) -> DriverSnapshot:
    """Poll the driver as the service does (only reports it has not seen) until ``until`` holds."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        snap = launcher.poll(job_id, reports[-1].seq if reports else 0)
        assert snap is not None, f"the driver of {job_id} is gone"
        reports.extend(snap.reports)
        if until(snap):
            return snap
        assert time.monotonic() < deadline, f"job {job_id}: {snap.status} after {JOB_TIMEOUT_S} s"
        time.sleep(0.2)


_LAUNCH_AND_EXIT = """
import sys
from service.core.ray_head import connect
from service.jobs.driver import RayLauncher
from workers.spec import JobSpec

connect(sys.argv[1])
RayLauncher().launch(JobSpec.model_validate_json(sys.argv[2]), run=1)
print("launched")
"""


@pytest.mark.slow
def test_a_job_launched_by_a_process_that_exits_runs_to_its_end(
        kafka_broker: EmbeddedBroker, ray_head: str, tmp_path: Path) -> None:
    n = 300
    spec = _spec(kafka_broker.bootstrap, _topic(kafka_broker, n), tmp_path, stop_at="end")
    out = subprocess.run([sys.executable, "-c", _LAUNCH_AND_EXIT, ray_head, spec.model_dump_json()],
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert out.returncode == 0 and out.stdout.strip() == "launched", out.stderr[-3000:]

    launcher = RayLauncher()
    reports: list[DriverReport] = []
    snap = _follow(launcher, spec.job_id, until=lambda s: s.result is not None, reports=reports)
    assert snap.result is not None and snap.result.state == snap.status == "finished", snap.result.error
    assert snap.run == 1 and snap.stop_reason is None
    assert snap.result.report is not None and snap.result.report.examples == n  # every record trained
    assert [r.seq for r in reports] == list(range(1, len(reports) + 1)) and len(reports) >= 2
    steps = [r.report.step for r in reports]
    assert steps == sorted(steps) and reports[-1].report.examples == n
    assert snap.result.checkpoint is not None and load_state(snap.result.checkpoint).counters.examples == n

    launcher.release(spec.job_id)
    assert launcher.poll(spec.job_id, 0) is None
    assert launcher.stop(spec.job_id, "too late") is False
    launcher.release(spec.job_id)  # releasing twice is no error


@pytest.mark.slow
def test_a_stop_ends_an_unbounded_job_with_a_checkpoint(kafka_broker: EmbeddedBroker, ray_head: str,
                                                         tmp_path: Path) -> None:
    spec = _spec(kafka_broker.bootstrap, _topic(kafka_broker, 200), tmp_path)  # stop_at: never
    launcher = RayLauncher()
    launcher.launch(spec, run=2)
    reports: list[DriverReport] = []
    running = _follow(launcher, spec.job_id, until=lambda s: bool(reports), reports=reports)
    assert running.status == "running" and running.run == 2
    assert launcher.stop(spec.job_id, "test says stop") is True
    snap = _follow(launcher, spec.job_id, until=lambda s: s.result is not None, reports=reports)
    result = snap.result
    assert result is not None and result.state == snap.status == "stopped", result.error
    assert snap.stop_reason == "test says stop"
    assert result.report is not None and result.report.stopped == "test says stop"
    assert result.checkpoint is not None and result.checkpoint_step == result.report.step
    state = load_state(result.checkpoint)
    assert state.counters.step == result.report.step and 0 < state.counters.examples <= 200
    assert [r.seq for r in reports] == list(range(1, len(reports) + 1))
    launcher.release(spec.job_id)
    assert launcher.poll(spec.job_id, 0) is None


@pytest.mark.slow
def test_a_preflight_failure_is_a_failed_result_kept_until_released(kafka_broker: EmbeddedBroker, ray_head: str,
                                                                     tmp_path: Path) -> None:
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    spec = _spec(kafka_broker.bootstrap, missing, tmp_path)
    launcher = RayLauncher()
    launcher.launch(spec, run=1)
    snap = _follow(launcher, spec.job_id, until=lambda s: s.result is not None, reports=[])
    assert snap.result is not None and snap.status == snap.result.state == "failed"
    assert snap.result.error is not None and missing in snap.result.error
    assert snap.reports == [] and snap.result.report is None
    # The actor keeps the result until the service stored it and releases it.
    again = launcher.poll(spec.job_id, 0)
    assert again is not None and again.result == snap.result
    launcher.release(spec.job_id)
    assert launcher.poll(spec.job_id, 0) is None


@pytest.mark.slow
def test_a_second_launch_of_a_live_job_id_is_refused(kafka_broker: EmbeddedBroker, ray_head: str,
                                                     tmp_path: Path) -> None:
    spec = _spec(kafka_broker.bootstrap, f"missing-{uuid.uuid4().hex[:8]}", tmp_path)
    launcher = RayLauncher()
    launcher.launch(spec, run=1)
    with pytest.raises(DriverExists, match=spec.job_id) as refused:
        RayLauncher().launch(spec, run=2)
    assert refused.value.status_code == 409
    snap = launcher.poll(spec.job_id, 0)
    assert snap is not None and snap.run == 1  # the first driver is untouched
    launcher.release(spec.job_id)
    launcher.launch(spec, run=2)  # released: the id can run again (a resume)
    snap = launcher.poll(spec.job_id, 0)
    assert snap is not None and snap.run == 2
    launcher.release(spec.job_id)


def test_a_launcher_in_a_process_without_ray_says_so() -> None:
    code = ("from service.jobs.driver import RayLauncher\n"
            "from workers.errors import RayClusterError\n"
            "try:\n    RayLauncher().ready()\nexcept RayClusterError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Ray is not connected" in out.stdout
