"""Every endpoint and error path of the REST API, through FastAPI's test client, a real SQLite
store in a temporary directory and an in-memory launcher (the drivers' side is set by the test;
tests/service/test_end_to_end.py runs the same API against real Ray and the real broker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.core.config import Settings
from service.core.security import TokenStore
from workers.errors import RayClusterError
from workers.report import JobReport, JobResult

from .fake_launcher import FakeLauncher

ADMIN = "admin-token-0123456789abcdef"
READER = "read-token-0123456789abcdef"
SASL_PASSWORD = "hunter2-sasl-password"


def spec(job_id: str = "job-a", **extra: object) -> dict[str, object]:
    return {"job_id": job_id,
            "source": {"bootstrap_servers": "127.0.0.1:9", "topic": "labels",
                       "client_config": {"sasl.password": SASL_PASSWORD, "security.protocol": "SASL_PLAINTEXT"}},
            "codec": {"format": {"kind": "json"}, "input_shape": [2], "num_classes": 2},
            "model": {"name": "mlp"}, "scaling": {"num_workers": 1}, **extra}


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def client(tmp_path: Path, launcher: FakeLauncher) -> Iterator[TestClient]:
    # The background sync is slowed to a crawl: tests call sync() themselves, so nothing races them.
    settings = Settings(data_dir=tmp_path, sync_interval_s=3600, lost_driver_grace_s=3600, max_body_bytes=64_000)
    tokens = TokenStore.parse([("admin", ADMIN), ("read", READER)], origin="test")
    with TestClient(create_app(settings, launcher=launcher, tokens=tokens)) as c:
        yield c


def sync(client: TestClient) -> None:
    client.app.state.cicw.jobs.sync()  # type: ignore[attr-defined]


def report(step: int, **fields: object) -> JobReport:
    return JobReport(step=step, examples=step * 10, **fields)  # type: ignore[arg-type]


# --- auth -------------------------------------------------------------------------------------
def test_missing_wrong_and_read_only_tokens(client: TestClient) -> None:
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/jobs", headers=auth("not-a-token-of-this-service"))
    assert r.status_code == 401 and r.json()["message"] == "invalid token"
    r = client.get("/v1/jobs", headers={"Authorization": f"Basic {ADMIN}"})
    assert r.status_code == 401
    assert client.get("/v1/jobs", headers=auth(READER)).status_code == 200
    r = client.post("/v1/jobs", json=spec(), headers=auth(READER))
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    assert client.get("/metrics").status_code == 401
    assert client.get("/healthz").status_code == 200


# --- submit, list, get -----------------------------------------------------------------------
def test_submit_masks_secrets_and_refuses_a_second_job_with_the_id(client: TestClient,
                                                                   launcher: FakeLauncher) -> None:
    r = client.post("/v1/jobs", json=spec(), headers=auth())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"] == "job-a" and job["state"] == "PENDING" and job["runs"] == 1
    assert job["spec"]["source"]["client_config"]["sasl.password"] == "***"
    assert SASL_PASSWORD not in r.text
    assert launcher.launched == [("job-a", 1)]
    # The driver gets the real secret; the API never shows it.
    assert launcher.drivers["job-a"].spec.source.client_config["sasl.password"] == SASL_PASSWORD
    assert SASL_PASSWORD not in client.get("/v1/jobs/job-a", headers=auth()).text
    r = client.post("/v1/jobs", json=spec(), headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "job_exists"


@pytest.mark.parametrize(("body", "field"), [
    ({**spec(), "job_id": "Bad Id"}, "job_id"),
    ({k: v for k, v in spec().items() if k != "source"}, "source"),
    ({**spec(), "codec": {"format": {"kind": "json"}, "input_shape": [2], "num_classes": 1}}, "codec.num_classes"),
    ({**spec(), "surprise": 1}, "surprise"),
])
def test_invalid_specs_name_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and r.json()["field"] == field


def test_list_filters_by_state_and_pages(client: TestClient, launcher: FakeLauncher) -> None:
    for i in range(5):
        assert client.post("/v1/jobs", json=spec(f"job-{i}"), headers=auth()).status_code == 201
    launcher.report("job-3", report(1))
    sync(client)
    seen, cursor = [], None
    while True:
        r = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=auth())
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"job-{i}" for i in reversed(range(5))]
    running = client.get("/v1/jobs", params={"state": "RUNNING"}, headers=auth()).json()["items"]
    assert [j["id"] for j in running] == ["job-3"]
    r = client.get("/v1/jobs", params={"state": "BORED"}, headers=auth())
    assert r.status_code == 422 and r.json()["field"] == "state"
    r = client.get("/v1/jobs", params={"cursor": "garbage"}, headers=auth())
    assert r.status_code == 422 and r.json()["field"] == "cursor"


def test_unknown_job_route_and_method(client: TestClient) -> None:
    r = client.get("/v1/jobs/nope", headers=auth())
    assert r.status_code == 404 and r.json()["code"] == "job_not_found"
    r = client.get("/v1/jobs/NOT_AN_ID", headers=auth())
    assert r.status_code == 422 and r.json()["field"] == "job_id"
    assert client.get("/v2/nothing", headers=auth()).json()["code"] == "not_found"
    r = client.put("/v1/jobs", headers=auth())
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"


# --- the job's life ---------------------------------------------------------------------------
def test_progress_stop_resume_and_delete(client: TestClient, launcher: FakeLauncher) -> None:
    client.post("/v1/jobs", json=spec(), headers=auth())
    launcher.report("job-a", report(5, lag=7, lag_per_partition={0: 3, 1: 4}, records_per_s=100.0))
    launcher.report("job-a", report(10, lag=2, lag_per_partition={0: 1, 1: 1}, checkpoint_step=10))
    sync(client)
    job = client.get("/v1/jobs/job-a", headers=auth(READER)).json()
    assert job["state"] == "RUNNING"
    p = job["progress"]
    assert (p["step"], p["records"], p["lag"], p["lag_per_partition"]) == (10, 100, 2, {"0": 1, "1": 1})
    assert p["last_checkpoint"]["step"] == 10

    r = client.delete("/v1/jobs/job-a", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "job_state_conflict"
    r = client.post("/v1/jobs/job-a/stop", json={"reason": "maintenance"}, headers=auth())
    assert r.status_code == 202 and r.json()["state"] == "STOPPING"
    assert launcher.drivers["job-a"].stop_reason == "maintenance"
    assert client.post("/v1/jobs/job-a/stop", headers=auth()).status_code == 202  # still stopping: no change
    launcher.end("job-a", JobResult(job_id="job-a", state="stopped",
                                    report=report(12, stopped="maintenance", checkpoint_step=12)))
    sync(client)
    job = client.get("/v1/jobs/job-a", headers=auth()).json()
    assert (job["state"], job["reason"], job["progress"]["step"]) == ("STOPPED", "maintenance", 12)
    assert job["ended_at"] is not None
    assert "job-a" not in launcher.drivers  # released once stored
    r = client.post("/v1/jobs/job-a/stop", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "job_state_conflict"

    r = client.post("/v1/jobs/job-a/resume", headers=auth())
    assert r.status_code == 202 and r.json()["state"] == "PENDING" and r.json()["runs"] == 2
    assert launcher.launched == [("job-a", 1), ("job-a", 2)]
    assert client.post("/v1/jobs/job-a/resume", headers=auth()).status_code == 409
    launcher.end("job-a", JobResult(job_id="job-a", state="finished", report=report(20)))
    sync(client)
    assert client.get("/v1/jobs/job-a", headers=auth()).json()["state"] == "SUCCEEDED"
    series = client.get("/v1/jobs/job-a/metrics", headers=auth()).json()
    assert [pt["report"]["step"] for pt in series["points"]] == [5, 10, 12, 20]
    assert [pt["run"] for pt in series["points"]] == [1, 1, 1, 2]
    assert client.delete("/v1/jobs/job-a", headers=auth()).status_code == 204
    assert client.get("/v1/jobs/job-a", headers=auth()).status_code == 404


def test_failures_become_states_with_reasons(tmp_path: Path, client: TestClient, launcher: FakeLauncher) -> None:
    client.post("/v1/jobs", json=spec("boom"), headers=auth())
    launcher.end("boom", JobResult(job_id="boom", state="failed", error="SourceClientError: unknown topic 'labels'"))
    sync(client)
    job = client.get("/v1/jobs/boom", headers=auth()).json()
    assert (job["state"], job["reason"]) == ("FAILED", "SourceClientError: unknown topic 'labels'")

    launcher.fail_launch = RayClusterError("Ray cluster at '10.0.0.1:6379' is unreachable")
    r = client.post("/v1/jobs", json=spec("no-ray"), headers=auth())
    assert r.status_code == 201
    assert r.json()["state"] == "FAILED" and "10.0.0.1:6379" in r.json()["reason"]


def test_a_job_whose_driver_vanished_is_failed_after_the_grace(client: TestClient, launcher: FakeLauncher) -> None:
    client.post("/v1/jobs", json=spec(), headers=auth())
    launcher.release("job-a")  # as if its Ray cluster restarted
    sync(client)
    assert client.get("/v1/jobs/job-a", headers=auth()).json()["state"] == "PENDING"  # within the grace
    client.app.state.cicw.jobs._grace_s = 0.0  # type: ignore[attr-defined]
    sync(client)
    job = client.get("/v1/jobs/job-a", headers=auth()).json()
    assert job["state"] == "FAILED" and "driver is gone" in job["reason"]


# --- artifacts without a checkpoint ---------------------------------------------------------------
def test_artifacts_of_a_job_without_checkpoints(client: TestClient) -> None:
    client.post("/v1/jobs", json=spec(checkpoint={"storage_path": "ckpts-none"}), headers=auth())
    assert client.get("/v1/jobs/job-a/checkpoints", headers=auth()).json() == {"items": []}
    r = client.get("/v1/jobs/job-a/model", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "no_checkpoint"
    r = client.post("/v1/jobs/job-a/predict", json={"inputs": [{"x": [0, 1]}]}, headers=auth())
    assert r.status_code == 409
    r = client.post("/v1/jobs/job-a/predict", json={"inputs": []}, headers=auth())
    assert r.status_code == 422 and r.json()["field"] == "inputs"
    r = client.get("/v1/jobs/job-a/checkpoints/checkpoint_nope", headers=auth())
    assert r.status_code == 404


# --- limits, health, metrics ---------------------------------------------------------------------
def test_oversized_bodies_are_413(client: TestClient) -> None:
    big = {"inputs": [{"x": [0.0] * 20_000}]}
    r = client.post("/v1/jobs/job-a/predict", json=big, headers=auth())
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while reading
        yield b'{"inputs": ['
        for _ in range(10_000):
            yield b"[1.0, 2.0, 3.0, 4.0],"
        yield b"[0]]}"

    r = client.post("/v1/jobs/job-a/predict", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 413


def test_readiness_names_what_is_down(client: TestClient, launcher: FakeLauncher) -> None:
    assert client.get("/readyz").json() == {"status": "ready"}
    launcher.ray_down = True
    r = client.get("/readyz")
    assert r.status_code == 503 and "Ray unreachable" in r.json()["message"]


def test_prometheus_exposition_of_jobs_and_requests(client: TestClient, launcher: FakeLauncher) -> None:
    client.post("/v1/jobs", json=spec(), headers=auth())
    launcher.report("job-a", report(3, rejected=2, lag_per_partition={0: 5}))
    sync(client)
    client.get("/v1/jobs/job-a", headers=auth())
    r = client.get("/metrics", headers=auth(READER))
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("cicw_records_trained_total", (("job", "job-a"),))] == 30
    assert samples[("cicw_records_rejected_total", (("job", "job-a"),))] == 2
    assert samples[("cicw_job_state", (("job", "job-a"), ("state", "RUNNING")))] == 1
    assert samples[("cicw_job_state", (("job", "job-a"), ("state", "PENDING")))] == 0
    got = [k for k in samples if k[0] == "cicw_http_requests_total"]
    assert any(("route", "/v1/jobs/{job_id}") in labels for _, labels in got)
    assert not any(("route", "/metrics") in labels for _, labels in got)


def test_jobs_survive_an_app_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, sync_interval_s=3600)
    tokens = TokenStore.parse([("admin", ADMIN)], origin="test")
    launcher = FakeLauncher()
    with TestClient(create_app(settings, launcher=launcher, tokens=tokens)) as c:
        c.post("/v1/jobs", json=spec(), headers=auth())
        launcher.report("job-a", report(4))
        sync(c)
    with TestClient(create_app(settings, launcher=launcher, tokens=tokens)) as c:
        launcher.end("job-a", JobResult(job_id="job-a", state="finished", report=report(9)))
        sync(c)  # ended while no service ran: reconciled to its real final state
        job = c.get("/v1/jobs/job-a", headers=auth()).json()
        assert (job["state"], job["progress"]["step"]) == ("SUCCEEDED", 9)
    raw = (tmp_path / "jobs.db").read_bytes()
    assert SASL_PASSWORD.encode() not in raw


def test_the_model_card_takes_weight_statistics_from_the_last_training_report(client: TestClient,
                                                                             launcher: FakeLauncher) -> None:
    from workers.report import CICWStepStats

    client.post("/v1/jobs", json=spec(), headers=auth())
    weights = CICWStepStats(num_examples=64, low_weight_fraction=0.3, class_mean_weight=[0.5, 1.5])
    launcher.report("job-a", report(10, cicw=weights, prequential_accuracy=0.8))
    # The final report covers no step of its own: no weights, no prequential accuracy.
    launcher.end("job-a", JobResult(job_id="job-a", state="finished",
                                    report=report(12, final=True, eval_accuracy=0.7, checkpoint_step=12)))
    sync(client)
    jobs = client.app.state.cicw.jobs  # type: ignore[attr-defined]
    card_report = jobs.latest_training_report(jobs.get("job-a"))
    assert card_report.cicw == weights and card_report.prequential_accuracy == 0.8
    assert (card_report.step, card_report.examples, card_report.eval_accuracy) == (12, 120, 0.7)
