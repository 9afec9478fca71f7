"""Resuming a job through the real parts (embedded broker, local Ray): with another number of
workers it resumes exactly once; on another topic it refuses to start, saying why."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Producer

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.topics import ensure_topic
from workers.runner import run_job
from workers.spec import JobSpec
from workers.train.checkpoint_meta import data_hash, read_meta
from workers.train.checkpoints import load_state

from .test_train_job import _lineage

pytestmark = pytest.mark.slow


def _fill(bootstrap: str, topic: str, n: int, partitions: int) -> None:
    ensure_topic(bootstrap, topic, partitions)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)) + 3 * np.eye(3, 8)[y]
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, json.dumps({"x": x[i].tolist(), "y": int(y[i])}).encode(), partition=i % partitions)
    assert producer.flush(10) == 0


def test_a_job_resumes_with_other_workers_and_refuses_another_topic(kafka_broker: EmbeddedBroker, local_ray: None,
                                                                    tmp_path: Path) -> None:
    topic, other = f"resume-{uuid.uuid4().hex[:8]}", f"resume-other-{uuid.uuid4().hex[:8]}"
    _fill(kafka_broker.bootstrap, topic, 300, 3)
    _fill(kafka_broker.bootstrap, other, 30, 1)
    two = JobSpec.model_validate({
        "job_id": "resume-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": kafka_broker.bootstrap, "topic": topic, "stop_at": "end", "batch_size": 16,
                   "max_wait_s": 0.05},
        "codec": {"format": {"kind": "json"}, "input_shape": [8], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "scaling": {"num_workers": 2}, "max_steps": 4,
        "checkpoint": {"every_steps": 2, "keep": 2, "storage_path": str(tmp_path / "ckpt")},
        "max_failures": 0, "record_log_dir": str(tmp_path / "records"),
    })
    first = run_job(two)
    assert first.state == "finished" and first.checkpoint is not None, first.error
    meta = read_meta(first.checkpoint)
    assert (meta.job_id, meta.topic, meta.partition_count, meta.step) == (two.job_id, topic, 3, 4)
    assert meta.data_hash == data_hash(two) and meta.offsets == load_state(first.checkpoint).offsets
    assert 0 < meta.examples == sum(meta.offsets.values()) < 300

    # One worker now: it takes every partition at the checkpoint's offsets, with streams of its own.
    one = two.model_copy(update={"scaling": two.scaling.model_copy(update={"num_workers": 1}), "max_steps": None})
    rest = run_job(one)
    assert rest.state == "finished", rest.error
    assert rest.report.examples == 300 and load_state(rest.checkpoint).offsets == {0: 100, 1: 100, 2: 100}
    lineage = _lineage(tmp_path / "records")
    assert len(lineage) == len(set(lineage)) == 300  # every record exactly once over both runs

    elsewhere = run_job(one.model_copy(update={"source": one.source.model_copy(update={"topic": other})}))
    assert elsewhere.state == "failed"
    assert f"trained on topic '{topic}'; the spec names '{other}'" in (elsewhere.error or ""), elsewhere.error
