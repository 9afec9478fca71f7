"""Codecs: every format decodes valid records and rejects each kind of bad one with a reason;
rejected records reach the dead-letter topic on the real broker with their provenance."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from PIL import Image

from workers.broker import EmbeddedBroker
from workers.codecs import decode_batch
from workers.dead_letters import OFFSET_HEADER, PARTITION_HEADER, REASON_HEADER, DeadLetterSink, dlq_topic
from workers.records import CodecSpec, ImageFormat, KafkaRecord, RawFormat


def _rec(value: bytes | None, offset: int = 0, *, partition: int = 0, label: int | None = None,
         key: bytes | None = None, clean: int | None = None) -> KafkaRecord:
    headers = []
    if label is not None:
        headers.append(("label", str(label).encode()))
    if clean is not None:
        headers.append(("clean_label", str(clean).encode()))
    return KafkaRecord("t", partition, offset, value, key=key, headers=tuple(headers))


def test_json_records_and_their_rejections() -> None:
    spec = CodecSpec(input_shape=(2, 2), num_classes=3)
    good = [json.dumps({"x": [[1, 2], [3, 4]], "y": 2, "id": "a"}).encode(),
            json.dumps({"x": [1, 2, 3, 4], "y": [0.2, 0.3, 0.5]}).encode()]
    bad = {b"{not json": "not JSON",
           json.dumps({"x": [1, 2, 3], "y": 0}).encode(): "shape",
           json.dumps({"x": [1, 2, 3, 4], "y": 3}).encode(): "out of range",
           json.dumps({"x": [1, 2, "nan", 4], "y": 0}).encode(): "rectangular array of numbers",
           json.dumps({"x": [1, 2, float("nan"), 4], "y": 0}).encode(): "NaN",
           json.dumps({"x": [1, 2, 3, 4]}).encode(): "invalid field(s): y",
           json.dumps({"x": [1, 2, 3, 4], "y": [0.5, 0.6, 0.1]}).encode(): "probability vector",
           b"x" * (2 << 20): "exceeds max_record_bytes"}
    records = [_rec(v, i) for i, v in enumerate([*good, *bad])] + [_rec(None, 99)]
    batch = decode_batch(records, spec)
    assert len(batch) == 2 and batch.inputs.shape == (2, 2, 2)
    torch.testing.assert_close(batch.targets, torch.tensor([[0.0, 0.0, 1.0], [0.2, 0.3, 0.5]]))
    reasons = [r.reason for r in batch.rejected]
    assert len(reasons) == len(bad) + 1
    for expected, got in zip([*bad.values(), "tombstone"], reasons):
        assert expected in got, (expected, got)
    assert batch.next_offsets == {("t", 0): 100}  # rejected records are consumed too
    assert batch.clean_labels.tolist() == [-1, -1]


def test_raw_records_with_header_or_key_labels() -> None:
    spec = CodecSpec(format=RawFormat(dtype="float32"), input_shape=(3,), num_classes=4)
    arr = np.array([1.0, -2.0, 0.5], dtype="<f4").tobytes()
    batch = decode_batch([_rec(arr, 0, label=1, clean=3), _rec(arr[:-4], 1, label=1), _rec(arr, 2),
                          _rec(np.array([1, np.inf, 0], "<f4").tobytes(), 3, label=0),
                          _rec(arr, 4, label=7), _rec(arr, 5, partition=1, label=2)], spec)
    assert batch.targets.tolist() == [1, 2] and batch.clean_labels.tolist() == [3, -1]
    torch.testing.assert_close(batch.inputs[0], torch.tensor([1.0, -2.0, 0.5]))
    assert [r.reason.split(" ")[0] for r in batch.rejected] == ["raw", "no", "features", "label"]
    assert batch.next_offsets == {("t", 0): 5, ("t", 1): 6}
    keyed = CodecSpec(format=RawFormat(label_from="key"), input_shape=(3,), num_classes=4)
    assert decode_batch([_rec(arr, key=b"3")], keyed).targets.tolist() == [3]


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 200, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_records() -> None:
    spec = CodecSpec(format=ImageFormat(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
                     input_shape=(3, 8, 8), num_classes=10)
    batch = decode_batch([_rec(_png((8, 8)), 0, label=4), _rec(_png((9, 8)), 1, label=4),
                          _rec(b"\x89PNG garbage", 2, label=4)], spec)
    assert batch.inputs.shape == (1, 3, 8, 8)
    expected = (200 / 255 - 0.5) / 0.25
    assert float(batch.inputs.mean()) == pytest.approx(expected, rel=1e-5)
    assert ["9x8" in batch.rejected[0].reason, "not a decodable image" in batch.rejected[1].reason] == [True, True]


def test_rejected_records_reach_the_dead_letter_topic(kafka_broker: EmbeddedBroker) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    for name in (topic, dlq_topic(topic)):
        admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(timeout=10)
    spec = CodecSpec(input_shape=(2,), num_classes=2)
    records = [KafkaRecord(topic, 0, 10, json.dumps({"x": [1, 2], "y": 1}).encode()),
               KafkaRecord(topic, 0, 11, b"garbage", key=b"k", headers=(("trace", b"abc"),))]
    batch = decode_batch(records, spec)
    sink = DeadLetterSink(Producer({"bootstrap.servers": kafka_broker.bootstrap}))
    assert sink.send(batch.rejected) == 1
    sink.flush()
    assert sink.counts[topic] == 1

    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": "dlq-check"})
    consumer.assign([TopicPartition(dlq_topic(topic), 0, 0)])
    msgs = []
    for _ in range(20):
        msgs += [m for m in consumer.consume(num_messages=10, timeout=0.5) if m.error() is None]
        if msgs:
            break
    consumer.close()
    assert len(msgs) == 1 and msgs[0].value() == b"garbage" and msgs[0].key() == b"k"
    headers = dict(msgs[0].headers())
    assert b"not JSON" in headers[REASON_HEADER]
    assert headers[PARTITION_HEADER] == b"0" and headers[OFFSET_HEADER] == b"11" and headers["trace"] == b"abc"
