"""Two service replicas on one PostgreSQL job store and one Ray cluster: a job submitted through
one is watched and stopped through the other, and keeps being reported while the replica that
submitted it is SIGKILLed. Both poll the job's driver; reports are stored once (by run and
sequence number) and states move by compare-and-set, so the replicas never undo each other."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from service.core.ray_head import read_head_record, stop_local_head
from workers.kafka.broker import EmbeddedBroker

from ..workers.test_train_job import _lineage
from .service_process import ServiceProcess
from .test_end_to_end import PARTITIONS, job_spec, produce

pytestmark = pytest.mark.slow

ADMIN = "replica-admin-token-0123456789"


@pytest.fixture
def replicas(tmp_path: Path, postgres_database: str) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    # Replicas share the store and the key that seals its secrets.
    env = {"CICW_SECRET_KEY": Fernet.generate_key().decode(), "CICW_DB_URL": postgres_database}
    first = ServiceProcess(tmp_path / "a", f"admin:{ADMIN}", env=env)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        first.start()
        head = read_head_record(tmp_path / "a" / "ray")
        assert head is not None
        second = ServiceProcess(tmp_path / "b", f"admin:{ADMIN}", env=env, args=("--ray-address", head.address))
        second.start()
        yield first, second
        second.kill()
    finally:
        first.kill()
        stop_local_head(tmp_path / "a" / "ray")


def call(service: ServiceProcess, method: str, path: str, **kw: Any) -> dict[str, Any]:
    r = httpx.request(method, f"{service.url}{path}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                      **kw)
    assert r.status_code < 300, r.text
    body: dict[str, Any] = r.json()
    return body


def wait_job(service: ServiceProcess, job_id: str, done: Any, what: str, timeout_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not done(job := call(service, "GET", f"/v1/jobs/{job_id}")):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {job} / {service.log()}")
        time.sleep(0.5)
    return job


def test_two_replicas_share_jobs_and_survive_the_loss_of_one(replicas: tuple[ServiceProcess, ServiceProcess],
                                                              kafka_broker: EmbeddedBroker, tmp_path: Path) -> None:
    a, b = replicas
    topic, job_id = f"replicas-{uuid.uuid4().hex[:8]}", f"replicas-{uuid.uuid4().hex[:6]}"
    produce(kafka_broker.bootstrap, topic, 0, 150)
    spec = job_spec(tmp_path, job_id, kafka_broker.bootstrap, topic)
    r = httpx.post(f"{a.url}/v1/jobs", content=spec.read_text(), timeout=30,
                   headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    # The other replica sees the job and its progress, from the shared store.
    wait_job(b, job_id, lambda j: j["progress"]["records"] >= 150, "150 records through replica b")
    r = httpx.post(f"{b.url}/v1/jobs", content=spec.read_text(), timeout=30,
                   headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert r.status_code == 409 and r.json()["code"] == "job_exists"

    a.kill()  # the replica that submitted it
    produce(kafka_broker.bootstrap, topic, 150, 150)
    wait_job(b, job_id, lambda j: j["progress"]["records"] >= 300, "300 records after replica a died")
    assert call(b, "POST", f"/v1/jobs/{job_id}/stop", json={"reason": "replica test"})["state"] == "STOPPING"
    stopped = wait_job(b, job_id, lambda j: j["state"] == "STOPPED", "STOPPED")
    assert stopped["reason"] == "replica test"
    # One lineage, every record once, whichever replica stored the reports.
    assert sorted(_lineage(tmp_path / f"records-{job_id}")) == sorted(
        (p, o) for p in range(PARTITIONS) for o in range(100))
    series = call(b, "GET", f"/v1/jobs/{job_id}/metrics", params={"max_points": 5000})
    # Both replicas stored reports: none twice (a stop's final report may share its step with the
    # periodic one before it, never its content), in order.
    reports = [json.dumps(p["report"], sort_keys=True) for p in series["points"]]
    assert len(reports) == len(set(reports)) == series["total_reports"]
    steps = [p["report"]["step"] for p in series["points"]]
    assert steps == sorted(steps) and series["points"][-1]["report"]["final"]
