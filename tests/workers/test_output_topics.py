"""The topics a job writes to exist before it starts: its preflight creates them on the broker."""

from __future__ import annotations

import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.topics import ensure_topic
from workers.runner import output_topics, preflight
from workers.spec import JobSpec


def test_preflight_creates_the_dead_letter_and_suspects_topics(kafka_broker: EmbeddedBroker, tmp_path: Path) -> None:
    topic, evaluation = f"out-{uuid.uuid4().hex[:8]}", f"eval-{uuid.uuid4().hex[:8]}"
    for name in (topic, evaluation):
        ensure_topic(kafka_broker.bootstrap, name, 2)
    spec = JobSpec.model_validate({
        "job_id": "test-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": kafka_broker.bootstrap, "topic": topic, "stop_at": "end"},
        "codec": {"format": {"kind": "json"}, "input_shape": [4], "num_classes": 3},
        "model": {"name": "mlp", "options": {"hidden": [8]}},
        "evaluation": {"topic": evaluation},
        "checkpoint": {"storage_path": str(tmp_path / "ckpt")},
        "suspects": {"topic": f"review-{topic}"},
    })
    wanted = output_topics(spec)
    assert wanted == [f"{topic}.dlq", f"{evaluation}.dlq", f"review-{topic}"]
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    assert not set(wanted) & set(admin.list_topics(timeout=10).topics)
    preflight(spec, ())
    listed = admin.list_topics(timeout=10).topics
    assert all(name in listed and listed[name].partitions for name in wanted)
    preflight(spec, ())  # a second start finds them and leaves them as they are
    listed = admin.list_topics(timeout=10).topics
    assert {name: len(listed[name].partitions) for name in wanted} == dict.fromkeys(wanted, 1)
