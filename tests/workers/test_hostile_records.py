"""One bad record never stops a job, on the real broker: hostile records mid-stream on a training
topic (JSON nested 5000 levels, a 10,000-digit integer, bytes that are not JSON, a NaN) and on the
evaluation topic are dead-lettered with a reason naming the problem, while a bounded job with
max_failures 0 trains every good record exactly once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from tests.workers.test_train_job import _lineage
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.dead_letters import OFFSET_HEADER, PARTITION_HEADER, REASON_HEADER, TOPIC_HEADER, dlq_topic
from workers.kafka.records import CodecSpec
from workers.kafka.source import SourceSpec
from workers.kafka.topics import ensure_topic
from workers.runner import run_job
from workers.spec import EvaluationSpec, JobSpec
from workers.train.evaluation import NOT_A_CLASS_INDEX, read_eval_set

pytestmark = pytest.mark.slow

Where = tuple[str, int, int]  # topic, partition, offset
DIM, CLASSES = 8, 3
# Each hostile value and a word its dead letter's reason must contain.
HOSTILE: dict[str, tuple[bytes, str]] = {
    "deep nesting": (b'{"x": ' + b"[" * 5000 + b"0" + b"]" * 5000 + b', "y": 0}', "nested too deeply"),
    "giant int": (b'{"x": [' + b"7" * 10_000 + b", 0, 0, 0, 0, 0, 0, 0], \"y\": 1}", "digits"),
    "not JSON": (b"\x00\xffnot json at all", "not JSON"),
    "NaN": (b'{"x": [NaN, 0, 0, 0, 0, 0, 0, 0], "y": 2}', "NaN"),
}


def _good(i: int, rng: np.random.Generator) -> tuple[bytes, int]:
    y = int(i % CLASSES)
    x = rng.normal(size=DIM) + np.eye(CLASSES, DIM)[y] * 3
    return json.dumps({"x": x.tolist(), "y": y}).encode(), y


class _Sent:
    """Produces records and learns where each landed from the broker's delivery reports."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self.where: dict[str, Where] = {}

    def send(self, name: str, topic: str, partition: int, value: bytes) -> None:
        def delivered(err: Any, msg: Any) -> None:
            assert err is None, err
            self.where[name] = (msg.topic(), msg.partition(), msg.offset())

        self.producer.produce(topic, value=value, partition=partition, on_delivery=delivered)

    def flush(self) -> dict[str, Where]:
        assert self.producer.flush(10) == 0
        return self.where


def _fill(bootstrap: str, topic: str, per_partition: int, hostile_at: dict[int, int], seed: int) -> tuple[
        dict[str, Where], dict[str, Where]]:
    """``per_partition`` good records on partitions 0 and 1, the HOSTILE ones interleaved on both
    (after the good record numbered ``hostile_at[p]``); (good, hostile) names to where they are."""
    rng = np.random.default_rng(seed)
    sent = _Sent(bootstrap)
    for p in (0, 1):
        for i in range(per_partition):
            sent.send(f"good-{p}-{i}", topic, p, _good(i, rng)[0])
            if i >= hostile_at[p] and i - hostile_at[p] < len(HOSTILE):  # one hostile record between goods
                name = list(HOSTILE)[i - hostile_at[p]]
                sent.send(f"{name}-{p}", topic, p, HOSTILE[name][0])
    where = sent.flush()
    good = {k: v for k, v in where.items() if k.startswith("good-")}
    return good, {k: v for k, v in where.items() if not k.startswith("good-")}


def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of partition 0 of ``topic``, read to its end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False})
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, 0)])
        msgs: list[Any] = []
        for _ in range(100):
            if len(msgs) >= high:
                break
            msgs += [m for m in consumer.consume(num_messages=100, timeout=0.5) if m.error() is None]
        return msgs
    finally:
        consumer.close()


def _dead_letters(bootstrap: str, topic: str) -> dict[Where, str]:
    """Source (topic, partition, offset) of each dead letter of ``topic``, and its reason."""
    out: dict[Where, str] = {}
    for m in _read_all(bootstrap, dlq_topic(topic)):
        h = dict(m.headers() or [])
        where = (h[TOPIC_HEADER].decode(), int(h[PARTITION_HEADER]), int(h[OFFSET_HEADER]))
        assert where not in out, f"{where} dead-lettered twice"
        out[where] = h[REASON_HEADER].decode()
    return out


def _assert_reasons(dead: dict[Where, str], hostile: dict[str, Where]) -> None:
    assert set(dead) == set(hostile.values())
    for name, where in hostile.items():
        assert HOSTILE[name.rsplit("-", 1)[0]][1] in dead[where], (name, dead[where])


def test_bad_records_on_the_evaluation_topic_are_left_out_and_returned(kafka_broker: EmbeddedBroker) -> None:
    bootstrap = kafka_broker.bootstrap
    topic = f"eval-bad-{uuid.uuid4().hex[:8]}"
    ensure_topic(bootstrap, topic, 2)
    good, hostile = _fill(bootstrap, topic, 20, {0: 3, 1: 12}, seed=5)
    sent = _Sent(bootstrap)
    row = json.dumps({"x": [0.0] * DIM, "y": [0.5, 0.5, 0.0]}).encode()  # a probability row: no class index
    one_hot = json.dumps({"x": [0.0] * DIM, "y": [0.0, 1.0, 0.0]}).encode()  # a class index in disguise
    sent.send("row", topic, 0, row)
    sent.send("one-hot", topic, 1, one_hot)
    extra = sent.flush()

    codec = CodecSpec(input_shape=(DIM,), num_classes=CLASSES)
    source = SourceSpec(bootstrap_servers=bootstrap, topic="unused", batch_size=16, max_wait_s=0.05)
    sets = [read_eval_set(EvaluationSpec(topic=topic), codec, source, rank=r, world_size=2) for r in (0, 1)]
    rejected = {(r.record.topic, r.record.partition, r.record.offset): r.reason for s in sets for r in s.rejected}
    assert set(rejected) == {*hostile.values(), extra["row"]}
    _assert_reasons({w: why for w, why in rejected.items() if w != extra["row"]}, hostile)
    assert rejected[extra["row"]] == NOT_A_CLASS_INDEX
    # Rank r owns partition r: its set is that partition's good records (and the one-hot one), in order.
    labels = [i % CLASSES for i in range(20)]
    assert sets[0].y.tolist() == labels and sets[1].y.tolist() == [*labels, 1]
    assert [len(s.x) for s in sets] == [20, 21] and bool(torch.isfinite(torch.cat([s.x for s in sets])).all())
    assert len(good) == 40 and extra["one-hot"] not in rejected


@pytest.fixture(scope="module")
def hostile_job(kafka_broker: EmbeddedBroker, local_ray: None,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A bounded job over a training topic and an evaluation topic that both carry hostile records."""
    bootstrap = kafka_broker.bootstrap
    tmp = tmp_path_factory.mktemp("hostile")
    topic, eval_topic = f"hostile-{uuid.uuid4().hex[:8]}", f"hostile-eval-{uuid.uuid4().hex[:8]}"
    for name, partitions in ((topic, 2), (dlq_topic(topic), 1), (eval_topic, 2), (dlq_topic(eval_topic), 1)):
        ensure_topic(bootstrap, name, partitions)
    good, hostile = _fill(bootstrap, topic, 150, {0: 40, 1: 97}, seed=1)
    eval_good, eval_hostile = _fill(bootstrap, eval_topic, 30, {0: 10, 1: 25}, seed=2)
    log_dir = tmp / "records"
    spec = JobSpec.model_validate({
        "job_id": "hostile-" + uuid.uuid4().hex[:6],
        "source": {"bootstrap_servers": bootstrap, "topic": topic, "stop_at": "end", "batch_size": 16,
                   "max_wait_s": 0.05},
        "codec": {"format": {"kind": "json"}, "input_shape": [DIM], "num_classes": CLASSES},
        "model": {"name": "mlp", "options": {"hidden": [16]}},
        "cicw": {"method": "cicw", "burn_in_steps": 2, "anneal_steps": 2},
        "checkpoint": {"every_steps": 5, "keep": 2, "storage_path": str(tmp / "ckpt")},
        "evaluation": {"topic": eval_topic, "every_steps": 4},
        "max_failures": 0, "record_log_dir": str(log_dir),
    })
    result = run_job(spec)
    yield {"result": result, "log_dir": log_dir, "bootstrap": bootstrap, "topic": topic, "good": good,
           "hostile": hostile, "eval_topic": eval_topic, "eval_good": eval_good, "eval_hostile": eval_hostile}


def test_a_job_trains_every_good_record_once_and_dead_letters_the_hostile_ones(hostile_job: dict[str, Any]) -> None:
    result = hostile_job["result"]
    assert result.error is None and result.state == "finished", result.error
    lineage = _lineage(hostile_job["log_dir"])
    assert len(lineage) == len(set(lineage))
    assert set(lineage) == {(p, o) for _, p, o in hostile_job["good"].values()}
    _assert_reasons(_dead_letters(hostile_job["bootstrap"], hostile_job["topic"]), hostile_job["hostile"])
    # The evaluation set is every good record of the evaluation topic (the hostile ones left out).
    assert result.report.eval_examples == len(hostile_job["eval_good"]) == 60


def test_hostile_evaluation_records_reach_the_evaluation_dead_letter_topic(hostile_job: dict[str, Any]) -> None:
    _assert_reasons(_dead_letters(hostile_job["bootstrap"], hostile_job["eval_topic"]), hostile_job["eval_hostile"])
