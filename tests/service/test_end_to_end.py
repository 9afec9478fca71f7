"""The service end to end over HTTP: `cicw-stream serve` as a real process on its embedded Ray
head, the embedded broker, and the CLI as a user runs it. One job is submitted, watched,
stopped, resumed (every record reaches the model exactly once across the stop), its checkpoint
downloaded and loaded, its model fetched and used to predict. Then the service is SIGKILLed
while jobs train: they keep training, and a restarted service reports them correctly, still
stops them, and reconciles a job that ended while it was down."""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from confluent_kafka import Producer
from safetensors.torch import load_file

from service.cli import main as cli
from service.core.ray_head import stop_local_head
from service.jobs.schemas import ModelCard
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.topics import ensure_topic
from workers.train.checkpoints import load_state

from ..workers.test_train_job import _lineage
from .service_process import ServiceProcess

pytestmark = pytest.mark.slow

ADMIN = "e2e-admin-token-0123456789"
READER = "e2e-read-token-0123456789"
PARTITIONS = 3


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("service")
    proc = ServiceProcess(data, f"admin:{ADMIN},read:{READER}").start()
    yield proc
    proc.kill()
    stop_local_head(data / "ray")


def produce(bootstrap: str, topic: str, start: int, n: int) -> list[dict[str, Any]]:
    """Records start..start+n-1, round-robin over the partitions; returns their values."""
    ensure_topic(bootstrap, topic, PARTITIONS)
    rng = np.random.default_rng(start)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)) + 3 * np.eye(3, 8)[y]
    values = [{"x": x[i].tolist(), "y": int(y[i])} for i in range(n)]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, json.dumps(value).encode(), partition=(start + i) % PARTITIONS)
    assert producer.flush(10) == 0
    return values


def job_spec(tmp: Path, job_id: str, bootstrap: str, topic: str, **source: Any) -> Path:
    path = tmp / f"{job_id}.json"
    path.write_text(json.dumps({
        "job_id": job_id,
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "batch_size": 16, "max_wait_s": 0.05, **source},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [16]}}, "scaling": {"num_workers": 1},
        "checkpoint": {"every_steps": 5, "keep": 3, "storage_path": str(tmp / "ckpt")},
        "report_every_steps": 2, "max_failures": 0, "record_log_dir": str(tmp / f"records-{job_id}"),
    }))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], service: ServiceProcess, *argv: str, token: str = ADMIN) -> Any:
    code = cli([*argv, "--url", service.url, "--token", token, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out) if out.strip() else None


def get_job(service: ServiceProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{service.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {READER}"}, timeout=10)
    r.raise_for_status()
    job: dict[str, Any] = r.json()
    return job


def trained(log_dir: Path) -> int:
    """Records in the job's lineage so far (0 while a log line is half written)."""
    try:
        return len(_lineage(log_dir))
    except (json.JSONDecodeError, KeyError, IndexError):
        return 0


def wait_for(what: str, check: Callable[[], bool], *, timeout_s: float = 150.0,
             on_timeout: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {on_timeout()}")
        time.sleep(0.5)


def wait_state(service: ServiceProcess, job_id: str, state: str, **kw: Any) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal last
        last = get_job(service, job_id)
        return last["state"] == state

    wait_for(f"{job_id} {state}", reached, on_timeout=lambda: f"{last} / log: {service.log()}", **kw)
    return last


def wait_records(service: ServiceProcess, job_id: str, n: int) -> None:
    wait_for(f"{job_id} to train {n} records",
             lambda: get_job(service, job_id)["progress"]["records"] >= n,
             on_timeout=lambda: f"{get_job(service, job_id)} / log: {service.log()}")


def test_submit_watch_stop_resume_download_model_predict(service: ServiceProcess, kafka_broker: EmbeddedBroker,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topic, job_id = f"e2e-{uuid.uuid4().hex[:8]}", f"e2e-{uuid.uuid4().hex[:6]}"
    values = produce(kafka_broker.bootstrap, topic, 0, 300)
    spec = job_spec(tmp_path, job_id, kafka_broker.bootstrap, topic)

    job = run_cli(capsys, service, "submit", str(spec))
    assert job["id"] == job_id and job["state"] in ("PENDING", "RUNNING")
    wait_records(service, job_id, 300)
    status = run_cli(capsys, service, "status", job_id, token=READER)
    assert status["state"] == "RUNNING" and status["progress"]["records"] == 300

    run_cli(capsys, service, "stop", job_id)
    stopped = wait_state(service, job_id, "STOPPED")
    first_step = stopped["progress"]["step"]
    values += produce(kafka_broker.bootstrap, topic, 300, 150)  # arrives while the job is stopped
    resumed = run_cli(capsys, service, "resume", job_id)
    assert resumed["runs"] == 2
    wait_records(service, job_id, 450)
    run_cli(capsys, service, "stop", job_id)
    final = wait_state(service, job_id, "STOPPED")
    assert final["progress"]["step"] > first_step

    # Exactly once across the stop: every record of both batches in the model's lineage, none twice.
    lineage = _lineage(tmp_path / f"records-{job_id}")
    assert sorted(lineage) == sorted((p, o) for p in range(PARTITIONS) for o in range(150))

    checkpoints = run_cli(capsys, service, "checkpoints", job_id, token=READER)["items"]
    assert checkpoints and checkpoints[0]["step"] == final["progress"]["step"]
    archive = tmp_path / "latest.tar.gz"
    run_cli(capsys, service, "download", job_id, "-o", str(archive), token=READER)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    (restored_dir,) = (tmp_path / "extracted").iterdir()
    state = load_state(str(restored_dir))
    assert state.offsets == {p: 150 for p in range(PARTITIONS)}

    model_dir = tmp_path / "model"
    run_cli(capsys, service, "model", job_id, "-o", str(model_dir), token=READER)
    card = ModelCard.model_validate_json(next(model_dir.glob("*.json")).read_text())
    assert (card.architecture, card.num_classes, card.step, card.records_trained) == (
        "mlp", 3, final["progress"]["step"], 450)
    weights = load_file(next(model_dir.glob("*.safetensors")))
    assert weights and all(t.isfinite().all() for t in weights.values())

    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps([{"x": v["x"]} for v in values[:20]]))
    answer = run_cli(capsys, service, "predict", job_id, str(inputs), token=READER)
    predictions = answer["predictions"]
    assert len(predictions) == 20 and answer["step"] == final["progress"]["step"]
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-5 and 0 <= p["label"] < 3 for p in predictions)
    # Three well separated clusters: a model trained on 450 of them predicts most of these.
    assert sum(p["label"] == v["y"] for p, v in zip(predictions, values[:20])) >= 12


def test_jobs_outlive_a_sigkilled_service(service: ServiceProcess, kafka_broker: EmbeddedBroker,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = kafka_broker.bootstrap
    steady_topic, bounded_topic = f"steady-{uuid.uuid4().hex[:8]}", f"bounded-{uuid.uuid4().hex[:8]}"
    produce(bootstrap, steady_topic, 0, 150)
    produce(bootstrap, bounded_topic, 0, 300)
    steady, bounded = f"steady-{uuid.uuid4().hex[:6]}", f"bounded-{uuid.uuid4().hex[:6]}"
    run_cli(capsys, service, "submit", str(job_spec(tmp_path, steady, bootstrap, steady_topic)))
    wait_records(service, steady, 150)
    run_cli(capsys, service, "submit", str(job_spec(tmp_path, bounded, bootstrap, bounded_topic, stop_at="end")))

    service.kill()
    # While no service runs: the steady job trains on new records, the bounded one finishes.
    produce(bootstrap, steady_topic, 150, 150)
    wait_for("the steady job to train the records produced while the service was down",
             lambda: trained(tmp_path / f"records-{steady}") == 300)
    wait_for("the bounded job to train all its records",
             lambda: trained(tmp_path / f"records-{bounded}") == 300)

    service.start()
    job = get_job(service, steady)
    assert job["state"] == "RUNNING"
    wait_records(service, steady, 300)  # its reports while the service was down reached the store
    done = wait_state(service, bounded, "SUCCEEDED")
    assert done["progress"]["records"] == 300 and done["ended_at"] is not None
    run_cli(capsys, service, "stop", steady)
    wait_state(service, steady, "STOPPED")
    assert sorted(_lineage(tmp_path / f"records-{steady}")) == sorted(
        (p, o) for p in range(PARTITIONS) for o in range(100))
