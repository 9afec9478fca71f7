"""The REST commands (``service.rest_cli``) and their client, driven through ``cicw-stream``'s
``main([...])`` against an in-process fake of the API (an httpx.MockTransport answering with the
contract's models). The end-to-end test through the real server lives with the server."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import yaml

from service.cli import main
from service.client import ApiClient, ApiError, ApiUnreachable
from service.client_config import ClientConfig, resolve_config
from service.jobs.schemas import (
    CheckpointDetail,
    CheckpointList,
    CheckpointRef,
    ErrorBody,
    JobList,
    JobOut,
    JobProgress,
    JobState,
    LastCheckpoint,
    MetricPoint,
    MetricSeries,
    ModelCard,
    Prediction,
    PredictResponse,
)
from service.rest_cli import EXIT_FOR_STATUS, ExitCode
from workers.report import JobReport

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-Zq9"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def job(job_id: str, state: JobState = JobState.RUNNING, *, step: int = 0, runs: int = 1,
        reason: str | None = None, report: JobReport | None = None, ckpt: CheckpointRef | None = None,
        spec: dict[str, Any] | None = None, age_s: int = 0) -> JobOut:
    return JobOut(id=job_id, state=state, reason=reason, spec=spec or {"job_id": job_id}, spec_hash="ab" * 32,
                  runs=runs, created_at=T0 - timedelta(seconds=age_s), updated_at=T0,
                  ended_at=None if state.active else T0,
                  progress=JobProgress(step=step, records=step * 64, lag=1000 - step if state.active else 0,
                                       lag_per_partition={0: 10, 1: 20}, records_per_s=512.0 if step else None,
                                       last_report=report,
                                       last_checkpoint=LastCheckpoint(step=ckpt.step, written_at=ckpt.written_at)
                                       if ckpt else None))


class FakeApi:
    """Emulates /v1/jobs: answers as the contract says, records every request. ``max_page`` caps
    page sizes so that listings span several pages."""

    def __init__(self, *, token: str | None = TOKEN, max_page: int = 2) -> None:
        self.token, self.max_page = token, max_page
        self.jobs: dict[str, JobOut] = {}
        self.timeline: dict[str, list[JobOut]] = {}  # successive answers of GET /v1/jobs/{id}
        self.checkpoints: dict[str, list[CheckpointDetail]] = {}
        self.archives: dict[tuple[str, str], bytes] = {}
        self.cards: dict[str, list[ModelCard]] = {}  # successive answers of GET .../model
        self.weights: dict[str, bytes] = {}
        self.metric_points: dict[str, list[MetricPoint]] = {}
        self.requests: list[httpx.Request] = []
        self.bodies: list[Any] = []
        self.fail_with: tuple[int, dict[str, Any] | str] | None = None
        self.break_stream_after: int | None = None
        self.prefix = ""

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = request.read()
        self.bodies.append(json.loads(body) if body else None)
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            return self._error(401, "unauthorized", "missing or wrong bearer token")
        if self.fail_with is not None:
            status, content = self.fail_with
            return (httpx.Response(status, json=content) if isinstance(content, dict)
                    else httpx.Response(status, text=content))
        # Ids are matched still quoted, then unquoted; ``prefix``: a service mounted under a path.
        path = request.url.raw_path.decode().partition("?")[0].removeprefix(self.prefix)
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                return handler(request, *map(unquote, match.groups()))
        return self._error(404, "not_found", f"no route {request.method} {request.url.path}")

    def _routes(self) -> list[tuple[str, str, Callable[..., httpx.Response]]]:
        j = r"/v1/jobs/([^/]+)"
        return [("POST", "/v1/jobs", self._submit), ("GET", "/v1/jobs", self._list), ("GET", j, self._get),
                ("POST", j + "/stop", self._stop), ("POST", j + "/resume", self._resume),
                ("DELETE", j, self._delete), ("GET", j + "/checkpoints", self._ckpts),
                ("GET", j + "/checkpoints/([^/]+)", self._ckpt),
                ("GET", j + "/checkpoints/([^/]+)/download", self._download),
                ("GET", j + "/model", self._card), ("GET", j + "/model/weights", self._weights),
                ("POST", j + "/predict", self._predict), ("GET", j + "/metrics", self._metrics)]

    @staticmethod
    def _error(status: int, code: str, message: str, field: str | None = None) -> httpx.Response:
        return httpx.Response(status, json=ErrorBody(code=code, message=message, field=field).model_dump())

    @staticmethod
    def _ok(model: JobOut | Any, status: int = 200) -> httpx.Response:
        return httpx.Response(status, content=model.model_dump_json(), headers={"content-type": "application/json"})

    def _job(self, job_id: str) -> JobOut | httpx.Response:
        if job_id in self.timeline:
            states = self.timeline[job_id]
            self.jobs[job_id] = states.pop(0) if len(states) > 1 else states[0]
        return self.jobs.get(job_id) or self._error(404, "job_not_found", f"no job {job_id!r}")

    def _submit(self, request: httpx.Request) -> httpx.Response:
        spec = json.loads(request.content)
        if spec["job_id"] in self.jobs:
            return self._error(409, "job_conflict", f"job {spec['job_id']!r} exists")
        self.jobs[spec["job_id"]] = job(spec["job_id"], JobState.PENDING, spec=spec)
        return self._ok(self.jobs[spec["job_id"]], 201)

    def _list(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        items = [j for j in self.jobs.values() if params.get("state") in (None, j.state.value)]
        start = int(params.get("cursor", "0"))
        end = start + min(int(params.get("limit", "50")), self.max_page)
        return self._ok(JobList(items=items[start:end], next_cursor=str(end) if end < len(items) else None))

    def _get(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        found = self._job(job_id)
        return found if isinstance(found, httpx.Response) else self._ok(found)

    def _stop(self, request: httpx.Request, job_id: str) -> httpx.Response:
        found = self._job(job_id)
        if isinstance(found, httpx.Response):
            return found
        if not found.state.active:
            return self._error(409, "job_conflict", f"job {job_id!r} is {found.state.value}, not running")
        reason = json.loads(request.content).get("reason", "stopped over REST")
        self.jobs[job_id] = found.model_copy(update={"state": JobState.STOPPING, "reason": reason})
        return self._ok(self.jobs[job_id], 202)

    def _resume(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        found = self._job(job_id)
        if isinstance(found, httpx.Response):
            return found
        if found.state.active:
            return self._error(409, "job_conflict", f"job {job_id!r} is {found.state.value}")
        self.jobs[job_id] = found.model_copy(update={"state": JobState.PENDING, "runs": found.runs + 1})
        return self._ok(self.jobs[job_id], 202)

    def _delete(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        found = self._job(job_id)
        if isinstance(found, httpx.Response):
            return found
        if found.state.active:
            return self._error(409, "job_conflict", f"job {job_id!r} is {found.state.value}: stop it first")
        del self.jobs[job_id]
        return httpx.Response(204)

    def _ckpts(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        details = self.checkpoints.get(job_id, [])
        return self._ok(CheckpointList(items=[CheckpointRef(**d.model_dump(include=set(CheckpointRef.model_fields)))
                                              for d in details]))

    def _find_ckpt(self, job_id: str, ckpt: str) -> CheckpointDetail | None:
        details = self.checkpoints.get(job_id, [])
        if ckpt == "latest":
            return details[0] if details else None
        return next((d for d in details if d.id == ckpt), None)

    def _ckpt(self, _request: httpx.Request, job_id: str, ckpt: str) -> httpx.Response:
        found = self._find_ckpt(job_id, ckpt)
        return self._ok(found) if found else self._error(404, "checkpoint_not_found", f"no checkpoint {ckpt!r}")

    def _stream(self, data: bytes, content_type: str) -> httpx.Response:
        return httpx.Response(200, stream=_Chunks(data, self.break_stream_after),
                              headers={"content-type": content_type})

    def _download(self, _request: httpx.Request, job_id: str, ckpt: str) -> httpx.Response:
        if (job_id, ckpt) not in self.archives:
            return self._error(404, "checkpoint_not_found", f"no checkpoint {ckpt!r}")
        return self._stream(self.archives[job_id, ckpt], "application/gzip")

    def _card(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        cards = self.cards.get(job_id)
        if not cards:
            return self._error(404, "model_not_found", f"job {job_id!r} has no checkpoint yet")
        return self._ok(cards.pop(0) if len(cards) > 1 else cards[0])

    def _weights(self, _request: httpx.Request, job_id: str) -> httpx.Response:
        return self._stream(self.weights[job_id], "application/octet-stream")

    def _predict(self, request: httpx.Request, job_id: str) -> httpx.Response:
        inputs = json.loads(request.content)["inputs"]
        # A deterministic "model": the label is the input's position mod 3, with probability 0.5 + label / 10.
        preds = [Prediction(label=i % 3, probabilities=[0.5 + (i % 3) / 10 if c == i % 3 else (0.5 - (i % 3) / 10) / 2
                                                        for c in range(3)]) for i in range(len(inputs))]
        return self._ok(PredictResponse(checkpoint="ckpt-b", step=40, predictions=preds))

    def _metrics(self, request: httpx.Request, job_id: str) -> httpx.Response:
        points = self.metric_points.get(job_id, [])
        keep = int(request.url.params.get("max_points", len(points)))
        return self._ok(MetricSeries(job_id=job_id, points=points[-keep:], total_reports=len(points)))


class _Chunks(httpx.SyncByteStream):
    """A streamed body in 256 KiB chunks; fails with a read error after ``break_after`` chunks."""

    def __init__(self, data: bytes, break_after: int | None) -> None:
        self.data, self.break_after = data, break_after

    def __iter__(self) -> Iterator[bytes]:
        for n, start in enumerate(range(0, len(self.data), 1 << 18)):
            if self.break_after is not None and n >= self.break_after:
                raise httpx.ReadError("connection reset by peer")
            yield self.data[start:start + (1 << 18)]


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


@pytest.fixture(autouse=True)
def client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting leaks in from the machine: empty environment, config dir under tmp_path."""
    for name in ("CICW_URL", "CICW_TOKEN", "CICW_TIMEOUT", "CICW_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CICW_TOKEN", TOKEN)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(api: FakeApi, *argv: str, sleep: Callable[[float], None] | None = None) -> int:
    return main(list(argv), transport=api.transport(), sleep=sleep)


def out_json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


# -- submit ------------------------------------------------------------------------------------------

def test_submit_sends_the_file_as_parsed_and_prints_the_job(api: FakeApi, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text((ROOT / "examples" / "fashion_mnist_job.yaml").read_text())
    assert cli(api, "submit", str(spec_file)) == ExitCode.OK
    assert capsys.readouterr().out == "submitted job fashion-mnist-demo (PENDING)\n"
    # The document itself, not a model dump with every default: the service applies its own.
    assert api.bodies[-1] == yaml.safe_load(spec_file.read_text())
    assert api.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"

    json_file = tmp_path / "job2.json"
    json_file.write_text(json.dumps({**yaml.safe_load(spec_file.read_text()), "job_id": "second"}))
    assert cli(api, "submit", str(json_file), "--json") == ExitCode.OK
    submitted = JobOut.model_validate(out_json(capsys))
    assert submitted.id == "second" and submitted.state is JobState.PENDING

    assert cli(api, "submit", str(json_file)) == ExitCode.CONFLICT  # the fake refuses a second "second"
    assert "job 'second' exists [HTTP 409 job_conflict]" in capsys.readouterr().err


def test_submit_checks_the_spec_locally_and_sends_nothing_when_it_is_bad(api: FakeApi, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    spec = yaml.safe_load((ROOT / "examples" / "fashion_mnist_job.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "optimizer": {"name": "sgd", "lr": -1}}))
    assert cli(api, "submit", str(bad)) == ExitCode.USAGE
    assert "optimizer.lr" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.json").write_text("{not json")
    for name, problem in (("missing.yaml", "cannot read"), ("list.yaml", "a job spec is a mapping"),
                          ("broken.json", "is not valid JSON")):
        assert cli(api, "submit", str(tmp_path / name), "--json") == ExitCode.USAGE
        error = json.loads(capsys.readouterr().err)
        assert error["status"] is None and error["code"] == "usage" and problem in error["message"]
    assert api.requests == []


# -- jobs --------------------------------------------------------------------------------------------

def test_jobs_follows_cursors_and_limit_cuts_with_a_cursor_to_continue(api: FakeApi,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(5):
        api.jobs[f"job-{i}"] = job(f"job-{i}", JobState.FAILED if i == 3 else JobState.RUNNING, step=10 * i,
                                   age_s=i)
    assert cli(api, "jobs") == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "RUNS", "STEP", "RECORDS", "LAG", "REC/S", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [f"job-{i}" for i in range(5)]  # 3 pages of <= 2
    assert lines[4].split()[:6] == ["job-3", "FAILED", "1", "30", "1,920", "0"]
    assert len(api.requests) == 3

    api.requests.clear()
    assert cli(api, "jobs", "--limit", "3", "--json") == ExitCode.OK
    listing = JobList.model_validate(out_json(capsys))
    assert [j.id for j in listing.items] == ["job-0", "job-1", "job-2"] and listing.next_cursor == "3"
    assert [r.url.params.get("limit") for r in api.requests] == ["3", "1"]  # asks only for what is missing

    assert cli(api, "jobs", "--state", "failed", "--json") == ExitCode.OK
    assert [j.id for j in JobList.model_validate(out_json(capsys)).items] == ["job-3"]
    assert api.requests[-1].url.params["state"] == "FAILED"
    assert cli(api, "jobs", "--state", "lost") == ExitCode.USAGE
    assert "--state must be one of PENDING, RUNNING" in capsys.readouterr().err

    api.jobs.clear()
    assert cli(api, "jobs") == ExitCode.OK and capsys.readouterr().out == "no jobs\n"


# -- status ------------------------------------------------------------------------------------------

REPORT = JobReport(step=120, examples=7680, loss=0.4321, prequential_accuracy=0.8125, eval_accuracy=0.79)
CKPT = CheckpointRef(id="checkpoint_2026-01-02_03-04-05.000001", step=100, examples=6400, written_at=T0)


def test_status_shows_progress_and_exits_1_for_a_failed_job(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.jobs["a"] = job("a", step=120, report=REPORT, ckpt=CKPT)
    assert cli(api, "status", "a") == ExitCode.OK
    text = dict(re.split(r":\s+", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert text["state"] == "RUNNING" and text["step"] == "120" and text["records"] == "7,680"
    assert text["lag"] == "880 (p0: 10, p1: 20)" and text["loss"] == "0.4321"
    assert text["prequential accuracy"] == "81.25%" and text["eval accuracy"] == "79.00%"
    assert text["last checkpoint"].startswith("step 100 (")

    api.jobs["b"] = job("b", JobState.FAILED, reason="broker unreachable for 300 s")
    assert cli(api, "status", "b", "--json") == ExitCode.FAILED
    shown = JobOut.model_validate(out_json(capsys))
    assert shown == api.jobs["b"]


def test_status_watch_redraws_until_the_job_ends(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.timeline["w"] = [job("w", JobState.PENDING), job("w", step=40, report=REPORT),
                         job("w", step=80, report=REPORT, ckpt=CKPT), job("w", JobState.SUCCEEDED, step=90, ckpt=CKPT)]
    slept: list[float] = []
    assert cli(api, "status", "w", "--watch", "--interval", "0.5", sleep=slept.append) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert slept == [0.5, 0.5, 0.5]  # one wait between polls, none after the last
    assert lines[0] == "PENDING | step 0 | 0 records | lag 1,000"
    assert lines[1] == "RUNNING | step 40 | 2,560 records | lag 960 | 512 rec/s | loss 0.432 | acc 81.2%"
    assert lines[2].endswith("| checkpoint @100")
    assert lines[3].startswith("SUCCEEDED | step 90") and lines[4] == "job w SUCCEEDED"

    api.timeline["f"] = [job("f"), job("f", JobState.FAILED, reason="worker crashed")]
    slept.clear()
    assert cli(api, "status", "f", "--watch", "--json", sleep=slept.append) == ExitCode.FAILED
    polls = [JobOut.model_validate_json(line) for line in capsys.readouterr().out.splitlines()]
    assert [p.state for p in polls] == [JobState.RUNNING, JobState.FAILED] and slept == [2.0]
    assert cli(api, "status", "f", "--watch", "--interval", "0") == ExitCode.USAGE


def test_status_watch_redraws_one_line_on_a_terminal(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Tty()
    monkeypatch.setattr(sys, "stdout", screen)
    api.timeline["w"] = [job("w", step=40), job("w", JobState.STOPPED, step=41, reason="asked")]
    assert cli(api, "status", "w", "--watch", sleep=lambda _: None) == ExitCode.OK
    first, second = ("RUNNING | step 40 | 2,560 records | lag 960 | 512 rec/s",
                     "STOPPED | step 41 | 2,624 records | lag 0 | 512 rec/s")
    # The second line overwrites the first, padded to its length; then the final state on its own line.
    assert screen.getvalue().split("\n") == [f"\r{first}\r{second.ljust(len(first))}", "job w STOPPED: asked", ""]


# -- stop, resume, delete ------------------------------------------------------------------------------

def test_stop_resume_delete(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.jobs["a"] = job("a")
    assert cli(api, "stop", "a", "--reason", "maintenance") == ExitCode.OK
    assert api.bodies[-1] == {"reason": "maintenance"}
    assert capsys.readouterr().out == "job a STOPPING: maintenance\n"
    assert cli(api, "delete", "a") == ExitCode.CONFLICT  # still active
    assert "stop it first [HTTP 409 job_conflict]" in capsys.readouterr().err

    api.jobs["b"] = job("b")
    assert cli(api, "stop", "b", "--json") == ExitCode.OK
    assert api.bodies[-1] == {}  # no reason given: the service's default
    assert JobOut.model_validate(out_json(capsys)).reason == "stopped over REST"

    api.jobs["a"] = job("a", JobState.STOPPED)
    assert cli(api, "resume", "a") == ExitCode.OK and capsys.readouterr().out == "job a PENDING (run 2)\n"
    assert cli(api, "resume", "a", "--json") == ExitCode.CONFLICT
    assert json.loads(capsys.readouterr().err)["code"] == "job_conflict"

    api.jobs["c"] = job("c", JobState.SUCCEEDED)
    assert cli(api, "delete", "c", "--purge") == ExitCode.OK
    assert api.requests[-1].method == "DELETE" and api.requests[-1].url.params["purge"] == "true"
    assert capsys.readouterr().out == "deleted job c and its checkpoints\n" and "c" not in api.jobs
    api.jobs["d"] = job("d", JobState.FAILED)
    assert cli(api, "delete", "d", "--json") == ExitCode.OK
    assert api.requests[-1].url.params["purge"] == "false" and capsys.readouterr().out == ""


# -- checkpoints and download ---------------------------------------------------------------------------

def detail(ckpt_id: str, step: int) -> CheckpointDetail:
    return CheckpointDetail(id=ckpt_id, step=step, examples=step * 64, written_at=T0 + timedelta(seconds=step),
                            offsets={0: step * 32, 1: step * 32}, size_bytes=123_456)


def test_checkpoints_list_and_detail(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.checkpoints["a"] = [detail("ckpt-b", 40), detail("ckpt-a", 20)]
    assert cli(api, "checkpoints", "a") == ExitCode.OK
    assert [line.split()[:3] for line in capsys.readouterr().out.splitlines()] == [
        ["ID", "STEP", "RECORDS"], ["ckpt-b", "40", "2,560"], ["ckpt-a", "20", "1,280"]]
    assert cli(api, "checkpoints", "a", "--json") == ExitCode.OK
    assert [c.id for c in CheckpointList.model_validate(out_json(capsys)).items] == ["ckpt-b", "ckpt-a"]
    assert cli(api, "checkpoints", "a", "latest") == ExitCode.OK
    text = capsys.readouterr().out
    assert "ckpt-b" in text and "p0: 1,280, p1: 1,280" in text and "123,456 bytes" in text
    assert cli(api, "checkpoints", "a", "ckpt-a", "--json") == ExitCode.OK
    assert CheckpointDetail.model_validate(out_json(capsys)) == api.checkpoints["a"][1]
    assert cli(api, "checkpoints", "nope") == ExitCode.OK and capsys.readouterr().out == "no checkpoints\n"
    assert cli(api, "checkpoints", "a", "ckpt-z") == ExitCode.NOT_FOUND


def test_download_streams_the_resolved_checkpoint_to_a_file(api: FakeApi, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    archive = os.urandom(3 * (1 << 20) + 17)  # several chunks of the stream
    api.checkpoints["a"] = [detail("ckpt-b", 40)]
    api.archives["a", "ckpt-b"] = archive
    assert cli(api, "download", "a") == ExitCode.OK
    written = tmp_path / "a-ckpt-b.tar.gz"  # "latest" resolved to its id, for the name and the URL
    assert written.read_bytes() == archive
    assert api.requests[-1].url.path == "/v1/jobs/a/checkpoints/ckpt-b/download"
    assert capsys.readouterr().out.startswith(f"wrote a-ckpt-b.tar.gz ({len(archive):,} bytes): checkpoint ckpt-b")

    assert cli(api, "download", "a", "ckpt-b", "-o", str(tmp_path / "out" / "x.tgz"), "--json") == ExitCode.OK
    saved = out_json(capsys)
    assert saved["path"] == str(tmp_path / "out" / "x.tgz") and saved["size_bytes"] == len(archive)
    assert (tmp_path / "out" / "x.tgz").read_bytes() == archive
    assert cli(api, "download", "a", "-o", str(tmp_path / "out")) == ExitCode.OK  # a directory: default name in it
    assert (tmp_path / "out" / "a-ckpt-b.tar.gz").read_bytes() == archive
    assert cli(api, "download", "a", "ckpt-x") == ExitCode.NOT_FOUND


def test_an_interrupted_download_leaves_the_destination_untouched(api: FakeApi, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    api.checkpoints["a"] = [detail("ckpt-b", 40)]
    api.archives["a", "ckpt-b"] = os.urandom(2 << 20)
    dest = tmp_path / "keep.tar.gz"
    dest.write_bytes(b"previous download")
    api.break_stream_after = 3
    assert cli(api, "download", "a", "-o", str(dest)) == ExitCode.UNREACHABLE
    assert "connection reset by peer" in capsys.readouterr().err
    assert dest.read_bytes() == b"previous download"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_server_chosen_ids_cannot_name_files_outside_the_directory(api: FakeApi, tmp_path: Path) -> None:
    api.checkpoints["a"] = [detail("../../escape", 40)]
    api.archives["a", "../../escape"] = b"data"
    assert cli(api, "download", "a") == ExitCode.OK
    assert (tmp_path / "a-_.._escape.tar.gz").read_bytes() == b"data"
    assert api.requests[-1].url.raw_path == b"/v1/jobs/a/checkpoints/..%2F..%2Fescape/download"


# -- model ---------------------------------------------------------------------------------------------

def card(ckpt: str, step: int) -> ModelCard:
    return ModelCard(job_id="a", architecture="mlp", num_classes=3, input_shape=[4],
                     record_format={"kind": "json"}, checkpoint=ckpt, step=step, records_trained=step * 64,
                     prequential_accuracy=0.8, spec_hash="ab" * 32, parameters=1234)


def test_model_writes_the_card_and_the_weights_of_one_checkpoint(api: FakeApi, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    api.weights["a"] = os.urandom(100_000)
    # A checkpoint lands between the first card and the weights: the client fetches all again.
    api.cards["a"] = [card("ckpt-a", 20), card("ckpt-b", 40)]
    assert cli(api, "model", "a") == ExitCode.OK
    assert (tmp_path / "a-model" / "model.safetensors").read_bytes() == api.weights["a"]
    assert ModelCard.model_validate_json((tmp_path / "a-model" / "model_card.json").read_text()) == card("ckpt-b", 40)
    assert [r.url.path for r in api.requests].count("/v1/jobs/a/model/weights") == 2
    assert "mlp, 1,234 parameters, checkpoint ckpt-b, step 40" in capsys.readouterr().out

    assert cli(api, "model", "a", "-o", str(tmp_path / "m"), "--json") == ExitCode.OK
    saved = out_json(capsys)
    assert saved["card"]["checkpoint"] == "ckpt-b" and saved["weights_bytes"] == 100_000
    assert Path(saved["card_path"]) == tmp_path / "m" / "model_card.json"
    assert cli(api, "model", "nope") == ExitCode.NOT_FOUND


# -- predict -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["array", "lines"])
def test_predict_reads_a_json_array_or_json_lines(api: FakeApi, tmp_path: Path, layout: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [{"x": [0.1, 0.2, 0.3, 0.4]}, {"x": [1, 2, 3, 4]}, [5, 6, 7, 8]]
    text = json.dumps(inputs) if layout == "array" else "\n".join(map(json.dumps, inputs)) + "\n\n"
    (tmp_path / "in.json").write_text(text)
    assert cli(api, "predict", "a", "in.json") == ExitCode.OK
    assert api.bodies[-1] == {"inputs": inputs}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "checkpoint ckpt-b (step 40)"
    assert [line.split() for line in lines[1:]] == [["#", "LABEL", "PROBABILITY"], ["0", "0", "0.5000"],
                                                   ["1", "1", "0.6000"], ["2", "2", "0.7000"]]
    assert cli(api, "predict", "a", "in.json", "--json") == ExitCode.OK
    assert [p.label for p in PredictResponse.model_validate(out_json(capsys)).predictions] == [0, 1, 2]


def test_predict_input_errors(api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"x": [1]}\n'))
    assert cli(api, "predict", "a", "-") == ExitCode.OK and api.bodies[-1] == {"inputs": [{"x": [1]}]}
    sent = len(api.requests)
    (tmp_path / "big.json").write_text(json.dumps([[0]] * 1025))
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"x": \n')
    for name, problem in (("big.json", "1025 inputs"), ("empty.json", "0 inputs"), ("bad.jsonl", "bad.jsonl:2:"),
                          ("none.json", "cannot read")):
        assert cli(api, "predict", "a", name) == ExitCode.USAGE
        assert problem in capsys.readouterr().err
    assert len(api.requests) == sent  # nothing sent


def test_metrics_table(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.metric_points["a"] = [MetricPoint(at=T0 + timedelta(seconds=s), run=1, report=JobReport(
        step=s, examples=s * 64, loss=1 / (s + 1), prequential_accuracy=0.5)) for s in (10, 20, 30)]
    assert cli(api, "metrics", "a", "--max-points", "2") == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 of 3 reports" and [line.split()[3] for line in lines[2:]] == ["20", "30"]
    assert api.requests[-1].url.params["max_points"] == "2"
    assert cli(api, "metrics", "a", "--json") == ExitCode.OK
    assert MetricSeries.model_validate(out_json(capsys)).total_reports == 3


# -- exit codes, errors, token ----------------------------------------------------------------------

@pytest.mark.parametrize(("status", "code"), [(404, 3), (401, 4), (403, 4), (409, 5), (422, 6), (413, 6),
                                              (500, 1), (503, 1)])
def test_error_statuses_map_to_exit_codes(api: FakeApi, status: int, code: int,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    api.fail_with = (status, {"code": f"code_{status}", "message": f"refused with {status}", "field": "inputs[2]",
                              "details": None})
    assert cli(api, "status", "a") == code == EXIT_FOR_STATUS.get(status, ExitCode.FAILED)
    expected = f"cicw-stream status: refused with {status} (inputs[2]) [HTTP {status} code_{status}]\n"
    assert capsys.readouterr().err == expected
    assert cli(api, "jobs", "--json") == code
    assert json.loads(capsys.readouterr().err) == {"status": status, "code": f"code_{status}",
                                                   "message": f"refused with {status}", "field": "inputs[2]",
                                                   "details": None}


def test_an_error_that_is_not_an_error_body_still_reads(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.fail_with = (502, "upstream connect error")
    assert cli(api, "jobs") == ExitCode.FAILED
    assert "upstream connect error [HTTP 502 http_502]" in capsys.readouterr().err
    api.fail_with = (200, {"not": "a job"})
    assert cli(api, "status", "a") == ExitCode.FAILED
    assert "the answer is not a JobOut" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_service_exits_7_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens: a real refused connection
    assert main(["jobs", "--url", url, "--timeout", "5"]) == ExitCode.UNREACHABLE
    err = capsys.readouterr().err
    assert f"the service at {url} is unreachable" in err and TOKEN not in err


def test_the_token_never_reaches_the_output(api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    api.jobs["a"] = job("a")
    outputs = []
    for argv in (["status", "a"], ["status", "a", "--json"], ["jobs", "--json"], ["stop", "nope"],
                 ["status", "a", "--url", "ftp://x"], ["status", "a", "--timeout", "-1"]):
        cli(api, *argv, "--token", TOKEN)
        outputs.append(capsys.readouterr())
    # A misbehaving server that echoes the token in its error message.
    api.fail_with = (403, {"code": "forbidden", "message": f"token {TOKEN} may not read"})
    for json_flag in ([], ["--json"]):
        assert cli(api, "status", "a", *json_flag) == ExitCode.AUTH
        outputs.append(capsys.readouterr())
    assert all(TOKEN not in o.out and TOKEN not in o.err for o in outputs)
    assert "token *** may not read" in outputs[-2].err
    config = resolve_config(warn=print)
    assert TOKEN not in repr(config) and TOKEN not in str(config) and TOKEN not in config.model_dump_json()


def test_api_errors_pickle() -> None:
    err = ApiError(409, ErrorBody(code="job_conflict", message="busy"))
    again = pickle.loads(pickle.dumps(err))
    assert (again.status, again.body, str(again)) == (409, err.body, "HTTP 409 job_conflict: busy")
    gone = pickle.loads(pickle.dumps(ApiUnreachable("the service at http://h is unreachable", "http://h")))
    assert gone.url == "http://h" and str(gone) == "the service at http://h is unreachable"


# -- configuration -------------------------------------------------------------------------------------

def _seen(api: FakeApi) -> tuple[str, str | None]:
    request = api.requests[-1]
    return f"{request.url.scheme}://{request.url.host}:{request.url.port}", request.headers.get("authorization")


def test_settings_come_from_flags_over_env_over_the_config_file(api: FakeApi, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    api.token = None  # this test looks at what is sent, not at what is accepted
    monkeypatch.delenv("CICW_TOKEN")
    assert cli(api, "jobs") == ExitCode.OK
    assert _seen(api) == ("http://127.0.0.1:8321", None)  # the defaults: no token, no header

    config = tmp_path / "xdg" / "cicw-stream" / "client.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("url: http://file-host:1001\ntoken: file-token\n")
    config.chmod(0o600)
    assert cli(api, "jobs") == ExitCode.OK
    assert _seen(api) == ("http://file-host:1001", "Bearer file-token")
    assert "warning" not in capsys.readouterr().err

    monkeypatch.setenv("CICW_TOKEN", "env-token")
    assert cli(api, "jobs") == ExitCode.OK
    assert _seen(api) == ("http://file-host:1001", "Bearer env-token")
    monkeypatch.setenv("CICW_URL", "http://env-host:1002/")
    assert cli(api, "jobs") == ExitCode.OK
    assert _seen(api) == ("http://env-host:1002", "Bearer env-token")

    assert cli(api, "jobs", "--url", "https://flag-host:1003", "--token", "flag-token") == ExitCode.OK
    assert _seen(api) == ("https://flag-host:1003", "Bearer flag-token")

    other = tmp_path / "other.yaml"  # $CICW_CONFIG names another file
    other.write_text("url: http://other-host:1004/prefix\ntoken: other-token\n")
    other.chmod(0o644)
    monkeypatch.delenv("CICW_URL")
    monkeypatch.delenv("CICW_TOKEN")
    monkeypatch.setenv("CICW_CONFIG", str(other))
    api.prefix = "/prefix"
    assert cli(api, "jobs") == ExitCode.OK
    assert _seen(api) == ("http://other-host:1004", "Bearer other-token")
    assert api.requests[-1].url.path == "/prefix/v1/jobs"  # a service behind a path prefix
    err = capsys.readouterr().err
    assert f"warning: client config {other} holds a token and is accessible by group or others (mode 644)" in err
    assert "other-token" not in err


def test_bad_settings_exit_2_naming_the_problem(api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "client.yaml"
    monkeypatch.setenv("CICW_CONFIG", str(config))
    for content, problem in (("url: http://h\ntokn: x\n", "unknown key(s) tokn"), ("- a\n", "must be a mapping"),
                             ("url: [\n", "not valid YAML"), ("timeout_s: 0\n", "'timeout_s'"),
                             ("url: http://user:pw@h\n", "must not hold credentials")):
        config.write_text(content)
        assert cli(api, "jobs") == ExitCode.USAGE
        assert problem in capsys.readouterr().err
    config.write_text("")
    assert cli(api, "jobs", "--url", "h:8321") == ExitCode.USAGE
    assert "must be http(s)://host" in capsys.readouterr().err
    assert api.requests == []


def test_client_used_directly() -> None:
    api = FakeApi(max_page=3)
    for i in range(7):
        api.jobs[f"j{i}"] = job(f"j{i}")
    with ApiClient(ClientConfig(token=TOKEN), transport=api.transport()) as client:
        assert [j.id for j in client.iter_jobs()] == [f"j{i}" for i in range(7)]
        assert [j.id for j in client.iter_jobs(limit=4)] == ["j0", "j1", "j2", "j3"]
        with pytest.raises(ApiError) as caught:
            client.get_job("missing")
        assert caught.value.status == 404 and caught.value.body.code == "job_not_found"


def test_help_lists_the_rest_commands_without_loading_the_http_client() -> None:
    code = ("import sys; from service.cli import build_parser; h = build_parser().format_help(); "
            "print('httpx' in sys.modules, 'pydantic' in sys.modules); print(h)")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert shown.startswith("False False\n")
    for command in ("submit", "jobs", "status", "stop", "resume", "delete", "checkpoints", "download", "model",
                    "predict", "metrics", "train", "produce"):
        assert re.search(rf"^\s+{command}\s", shown, re.MULTILINE), command


def test_ctrl_c_while_watching_exits_130_and_leaves_the_job_alone(api: FakeApi,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    api.jobs["w"] = job("w", step=40)

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    assert cli(api, "status", "w", "--watch", sleep=interrupt) == ExitCode.INTERRUPTED
    assert "interrupted; the job goes on" in capsys.readouterr().err
    assert [r.method for r in api.requests] == ["GET"]  # no stop was sent
