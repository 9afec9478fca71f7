"""A bounded job end to end: real broker, local Ray with 2 workers, DDP, CICW-M, checkpoints."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from workers.data.produce import ProduceSpec, produce
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.dead_letters import OFFSET_HEADER, PARTITION_HEADER, TOPIC_HEADER, dlq_topic
from workers.kafka.topics import ensure_topic
from workers.report import JobReport
from workers.runner import run_job
from workers.spec import JobSpec
from workers.train.checkpoints import load_state

pytestmark = pytest.mark.slow



def test_bounded_job_consumes_every_record_once_and_checkpoints_offsets(
        kafka_broker: EmbeddedBroker, local_ray: None, tmp_path: Path) -> None:
    topic = f"job-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 3)  # fewer partitions than... and not divisible by 2 workers
    ensure_topic(kafka_broker.bootstrap, dlq_topic(topic), 1)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = (rng.normal(size=(600, 8)) + np.eye(3, 8)[y] * 3).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    bootstrap = kafka_broker.bootstrap
    produce(ProduceSpec(bootstrap_servers=bootstrap, topic=topic, dataset="npz", path=str(tmp_path / "d.npz"),
                        format="json", noise="symmetric", rate=0.2), Producer({"bootstrap.servers": bootstrap}),
            partitions=3)
    garbage = Producer({"bootstrap.servers": bootstrap})
    for p in range(3):
        garbage.produce(topic, value=b"not json", partition=p)
    garbage.flush(10)

    spec = JobSpec.model_validate({
        "job_id": "test-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "stop_at": "end", "batch_size": 32},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [32]}},
        # A step schedule: this test checks the weights in force at the end, and one pass over a
        # stream keeps the memorization gate shut.
        "cicw": {"method": "cicw_m", "gate": "steps", "burn_in_steps": 3, "anneal_steps": 3},
        # both triggers: every 4 steps, and every 0.2 s (decided by all ranks together)
        "checkpoint": {"every_steps": 4, "every_s": 0.2, "keep": 2, "storage_path": str(tmp_path / "ckpt")},
        "report_every_steps": 2, "record_log_dir": str(tmp_path / "records"),
    })
    reports: list[JobReport] = []
    result = run_job(spec, on_report=reports.append)
    assert result.state == "finished" and result.error is None, result.error
    report = result.report
    assert report is not None and report.final
    # 20% of labels flipped (clean label in a header): down-weighted records are mostly the
    # flipped ones (chance level would be 0.2).
    assert report.noise_precision is not None and report.noise_precision >= 0.5
    assert report.noise_recall is not None and report.noise_recall > 0
    weights = [r.cicw for r in reports if r.cicw is not None]  # the step reports carry the weights' stats
    assert weights and not weights[-1].in_burn_in and sum(weights[-1].weight_histogram) == weights[-1].num_examples
    assert reports[-1].final and [r.step for r in reports] == sorted(r.step for r in reports)
    # What the service's metrics read: the lag of every partition (both ranks' partitions: rank 0
    # reads 0 and 2, rank 1 reads 1), rank 0's step times, the time of the latest checkpoint.
    assert report.lag_per_partition == {0: 0, 1: 0, 2: 0} and report.lag == 0
    assert 0 < report.step_seconds_count <= report.step and report.step_seconds_sum > 0
    checkpointed = [r for r in reports if r.checkpoint_step is not None]
    assert checkpointed and all(r.checkpoint_seconds is not None for r in checkpointed)
    assert report.checkpoint_seconds is not None and report.checkpoint_seconds > 0
    # 600 records round-robin (offsets 0-199 on each partition), then 1 garbage each (offset 200):
    # the model trained every good record once, and every bad one is on the dead-letter topic.
    lineage = _lineage(tmp_path / "records")
    assert sorted(lineage) == [(p, o) for p in range(3) for o in range(200)]
    assert set(_dead_letters(bootstrap, topic)) == {(topic, p, 200) for p in range(3)}
    assert report.examples == 600 and report.rejected == 3
    state = load_state(result.checkpoint)
    per_partition = {p: 200 + 1 for p in range(3)}
    assert state.offsets == per_partition
    assert state.counters.step == result.checkpoint_step == report.step > 0

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": spec.consumer_group})
    committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    consumer.close()
    assert {tp.partition: tp.offset for tp in committed} == per_partition


def test_train_command_rejects_a_bad_spec_naming_the_field(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from service.cli import main as cli_main

    bad = tmp_path / "job.yaml"
    bad.write_text("job_id: ok\nsource: {bootstrap_servers: 'x:1', topic: t}\n"
                   "codec: {input_shape: [4], num_classes: 3}\ncicw: {method: bogus}\n")
    assert cli_main(["train", str(bad)]) == 2
    assert "cicw.method" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2


def _lineage(log_dir: Path) -> list[tuple[int, int]]:
    """(partition, offset) of every record in the final model's lineage, from the record logs.

    In each rank's log, an attempt is a run of lines from one worker process. The next attempt
    resumed from a checkpoint taken at some step s: what this attempt trained after s never
    reached the final model, so it is dropped.
    """
    kept: list[tuple[int, int]] = []
    for f in sorted(log_dir.glob("rank*.jsonl")):
        runs: list[list[dict]] = []
        for line in map(json.loads, f.read_text().splitlines()):
            if not runs or runs[-1][0]["pid"] != line["pid"]:
                runs.append([])
            runs[-1].append(line)
        for i, run in enumerate(runs):
            limit = runs[i + 1][0]["resumed_from"] if i + 1 < len(runs) else float("inf")
            kept += [tuple(r) for line in run if line["step"] <= limit for r in line["records"]]
    return kept


def _trained_until(log_dir: Path, step: int) -> set[tuple[int, int]]:
    """(partition, offset) of the records trained at steps up to ``step``, by any attempt."""
    return {tuple(r) for f in log_dir.glob("rank*.jsonl") for line in map(json.loads, f.read_text().splitlines())
            if line["step"] <= step for r in line["records"]}


def _dead_letters(bootstrap: str, topic: str, *, idle_s: float = 3.0) -> list[tuple[str, int, int]]:
    """(source topic, partition, offset) of every record on ``<topic>.dlq``, from its identity
    headers: read from the beginning until nothing more comes for ``idle_s`` (the embedded
    broker's high watermark can trail the true end, so it cannot say when all were read)."""
    dlq = dlq_topic(topic)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-reader-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    try:
        partitions = list(consumer.list_topics(dlq, timeout=10).topics[dlq].partitions)
        consumer.assign([TopicPartition(dlq, p, OFFSET_BEGINNING) for p in partitions])
        letters: list[tuple[str, int, int]] = []
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            letters.append((headers[TOPIC_HEADER].decode(), int(headers[PARTITION_HEADER]),
                            int(headers[OFFSET_HEADER])))
            last = time.monotonic()
        return letters
    finally:
        consumer.close()


def _wait_for_line(log: Path, matches: Callable[[dict[str, Any]], bool], timeout_s: float = 120) -> dict[str, Any]:
    """The first line of a record log that matches, once written."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        for line in lines:
            if matches(line):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no such line in {log} after {timeout_s} s")


def test_worker_killed_mid_run_resumes_exactly_once(kafka_broker: EmbeddedBroker, local_ray: None,
                                                    tmp_path: Path) -> None:
    topic = f"kill-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 4000)
    np.savez(tmp_path / "d.npz", x=(rng.normal(size=(4000, 8)) + np.eye(3, 8)[y]).astype(np.float32), y=y)
    produce(ProduceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, dataset="npz",
                        path=str(tmp_path / "d.npz"), format="json"),
            Producer({"bootstrap.servers": kafka_broker.bootstrap}), partitions=2)
    log_dir = tmp_path / "records"
    spec = JobSpec.model_validate({
        "job_id": "kill-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": kafka_broker.bootstrap, "topic": topic, "stop_at": "end",
                   "batch_size": 16, "max_wait_s": 0.05},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "cicw": {"method": "cicw", "burn_in_steps": 2, "anneal_steps": 2},
        "checkpoint": {"every_steps": 5, "keep": 2, "storage_path": str(tmp_path / "ckpt")},
        "max_failures": 2, "record_log_dir": str(log_dir),
    })

    # Rank 1 dies at a random step, then rank 0 of the restarted group a random number of steps
    # after it resumed: neither waits for a checkpoint to be registered, so a restart may resume
    # from an older one than the latest written (the lineage must be exactly once either way).
    seed = random.randrange(2**16)
    rng = random.Random(seed)
    first_at, second_after = rng.randint(3, 30), rng.randint(1, 20)
    killed: list[tuple[int, int]] = []  # (rank, pid)

    def killer() -> None:
        line = _wait_for_line(log_dir / "rank1.jsonl", lambda line: line["step"] >= first_at)
        os.kill(line["pid"], signal.SIGKILL)
        killed.append((1, line["pid"]))
        first_rank0 = _wait_for_line(log_dir / "rank0.jsonl", lambda line: True)["pid"]
        line = _wait_for_line(log_dir / "rank0.jsonl", lambda line: line["pid"] != first_rank0
                              and line["step"] >= line["resumed_from"] + second_after)
        os.kill(line["pid"], signal.SIGKILL)
        killed.append((0, line["pid"]))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_job(spec)
    thread.join(timeout=5)
    context = f"seed {seed}: kill rank 1 at step {first_at}, rank 0 {second_after} steps after the restart"
    assert [rank for rank, _ in killed] == [1, 0], f"the job finished before both kills ({context})"
    assert result.state == "finished" and result.error is None, (result.error, context)
    attempts = {json.loads(x)["pid"] for x in (log_dir / "rank0.jsonl").read_text().splitlines()}
    assert len(attempts) == 3, context  # the job really restarted twice
    lineage = _lineage(log_dir)
    assert len(lineage) == len(set(lineage)), context  # no record trained twice into the final model
    assert sorted(lineage) == [(p, o) for p in range(2) for o in range(2000)], context  # and none missing
    assert load_state(result.checkpoint).offsets == {0: 2000, 1: 2000}
