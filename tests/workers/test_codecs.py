"""Codecs: every format decodes valid records and rejects each kind of bad one with a reason;
rejected records reach the dead-letter topic on the real broker with their provenance. The
columnar raw path agrees record by record with the per-record checks."""

from __future__ import annotations

import io
import itertools
import json
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from PIL import Image

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.codecs import RecordRejected, _clean_label, decode_batch, decode_features, decode_record
from workers.kafka.dead_letters import OFFSET_HEADER, PARTITION_HEADER, REASON_HEADER, DeadLetterSink, dlq_topic
from workers.kafka.records import CodecSpec, ImageFormat, KafkaRecord, RawFormat, RecordChunk


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
    scaled = CodecSpec(format=RawFormat(scale=0.5), input_shape=(3,), num_classes=4)
    assert decode_batch([_rec(arr, label=1)], scaled).inputs.tolist() == [[0.5, -1.0, 0.25]]


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


def _chunk(rows: list[tuple[int, int, bytes | None, list[tuple[str, bytes | None]] | None]],
           topic: str = "t") -> RecordChunk:
    """A chunk as a client builds it: (partition, offset, value, headers) per record."""
    return RecordChunk(topic, [v for _, _, v, _ in rows], [p for p, _, _, _ in rows], [o for _, o, _, _ in rows],
                       [None] * len(rows), [tuple(h) if h else None for _, _, _, h in rows],
                       [1000 + o for _, o, _, _ in rows])


class _DLQProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, value, dict(headers or [])))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def test_raw_chunk_rejects_bad_records_in_place_and_keeps_the_rest_in_order() -> None:
    spec = CodecSpec(format=RawFormat(dtype="float32"), input_shape=(2,), num_classes=10)

    def val(a: float, b: float) -> bytes:
        return np.array([a, b], dtype="<f4").tobytes()

    lab = [("label", b"1")]
    rows = [(0, 10, val(1, 2), [("label", b"0"), ("clean_label", b"2")]),
            (1, 20, val(3, 4), lab),
            (0, 11, val(5, 6)[:-1], lab),                                     # short value
            (1, 21, None, lab),                                               # tombstone
            (0, 12, val(7, 8), [("label", b"12")]),                           # label out of range
            (1, 22, val(9, np.nan), lab),                                     # NaN feature
            (0, 13, val(10, 11), [("label", b"07"), ("clean_label", b"1")]),  # unusual but valid label
            (1, 23, val(12, 13), [("label", b"2"), ("clean_label", None)]),   # clean label without a value
            (0, 14, val(14, 15), [("label", b"0"), ("label", b"2")])]         # repeated: the last wins
    chunk = _chunk(rows)
    batch = decode_batch(chunk, spec)
    assert [(r.record.partition, r.record.offset) for r in batch.rejected] == [
        (0, 11), (1, 21), (0, 12), (1, 22), (1, 23)]
    assert [r.reason.split(" ")[0] for r in batch.rejected] == ["raw", "empty", "label", "features", "clean"]
    torch.testing.assert_close(batch.inputs, torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 11.0], [14.0, 15.0]]))
    assert batch.targets.tolist() == [0, 1, 7, 2] and batch.clean_labels.tolist() == [2, -1, 1, -1]
    assert batch.next_offsets == {("t", 0): 15, ("t", 1): 24}  # rejected records are consumed too
    # The rejected records are the chunk's own records: the train loop tells them apart by identity.
    kept = [r for r in chunk if all(r is not rej.record for rej in batch.rejected)]
    assert [(r.partition, r.offset) for r in kept] == [(0, 10), (1, 20), (0, 13), (0, 14)]
    assert chunk[3] is batch.rejected[1].record and chunk[3].value is None and chunk[3].timestamp_ms == 1021
    # Dead-letter routing reads the rejected records like any KafkaRecord.
    dlq = _DLQProducer()
    assert DeadLetterSink(dlq).send(batch.rejected) == 5
    assert [(h[PARTITION_HEADER], h[OFFSET_HEADER]) for _, _, h in dlq.sent] == [
        (b"0", b"11"), (b"1", b"21"), (b"0", b"12"), (b"1", b"22"), (b"1", b"23")]
    assert {t for t, _, _ in dlq.sent} == {dlq_topic("t")} and dlq.sent[1][1] is None
    assert dlq.sent[0][2]["label"] == b"1" and dlq.sent[4][2]["clean_label"] == b""


@pytest.mark.parametrize("label_from", ["header", "key"])
def test_raw_chunk_agrees_with_the_per_record_checks(label_from: str) -> None:
    # The bulk path must accept, reject and parse exactly as decode_record and the clean-label
    # check do, record by record, whatever the label's spelling.
    spec = CodecSpec(format=RawFormat(dtype="uint8", label_from=label_from, scale=1 / 255),  # type: ignore[arg-type]
                     input_shape=(3,), num_classes=10, max_record_bytes=3)
    spellings: list[bytes | None] = [b"0", b"9", b"10", b"07", b" 3", b"3 ", b"+3", b"-1", b"x", b"", None,
                                     "\u0663".encode()]
    records = []
    for i, (label, clean) in enumerate(itertools.product(spellings, [None, b"4", b"10", b"z"])):
        headers: list[tuple[str, bytes]] = [("trace", b"t")]
        if label is not None and label_from == "header":
            headers.append(("label", label))
        if clean is not None:
            headers.append(("clean_label", clean))
        value = bytes([i % 256, 1, 2]) if i % 7 else bytes(4)  # some too long
        records.append(KafkaRecord("t", i % 3, i, value, key=label if label_from == "key" else None,
                                   headers=tuple(headers)))
    chunk = RecordChunk.of_records(records)
    assert chunk is not None
    batch = decode_batch(chunk, spec)
    expected_rejected, xs, ys, cs = [], [], [], []
    for rec in records:
        try:
            x, y = decode_record(rec, spec)
            c = _clean_label(rec, spec)
        except RecordRejected as exc:
            expected_rejected.append((rec, exc.reason))
            continue
        xs.append(x)
        ys.append(y)
        cs.append(c)
    assert [(r.record, r.reason) for r in batch.rejected] == expected_rejected
    assert all(r.record is rec for r, (rec, _) in zip(batch.rejected, expected_rejected))
    assert batch.targets.tolist() == ys and batch.clean_labels.tolist() == cs
    torch.testing.assert_close(batch.inputs, torch.from_numpy(np.stack(xs)))
    assert batch.next_offsets == {("t", p): max(r.offset for r in records if r.partition == p) + 1 for p in range(3)}


def test_record_chunk_behaves_as_a_sequence_of_records() -> None:
    rows = [(0, 5, b"a", [("h", b"1")]), (1, 7, b"b", None), (0, 6, None, [("h", None)]), (1, 8, b"d", None)]
    chunk = _chunk(rows)
    assert len(chunk) == 4 and not RecordChunk.empty() and RecordChunk.empty() == []
    assert chunk[2] == KafkaRecord("t", 0, 6, None, None, (("h", b""),), 1006) and chunk[2] is chunk[-2]
    assert [r.offset for r in chunk[1:3]] == [7, 6] and [r.offset for r in chunk.take([3, 0])] == [8, 5]
    assert chunk == list(chunk) and chunk[1:] != chunk
    joined = RecordChunk.concat([chunk[:1], RecordChunk.empty("t"), chunk[1:]])
    assert joined == chunk and joined.last_offsets() == {0: 6, 1: 8} and joined.next_offsets() == {0: 7, 1: 9}
    assert chunk.header_values("h", "-") == [b"1", "-", None, "-"]
    assert chunk.header_columns(("h", "h"), "-") == chunk.header_columns(("h", "x", "h"), "-")[::2] == [
        [b"1", "-", None, "-"]] * 2
    with pytest.raises(IndexError):
        chunk[4]
    # A chunk of KafkaRecords yields those very objects, in slices too.
    records = [KafkaRecord("u", 0, i, b"v") for i in range(3)]
    of = RecordChunk.of_records(records)
    assert of is not None and of[1] is records[1] and of[1:][0] is records[1]
    assert RecordChunk.of_records([KafkaRecord("u", 0, 0, b""), KafkaRecord("w", 0, 0, b"")]) is None


@pytest.mark.parametrize("error", [MemoryError(), RecursionError("deep"), RuntimeError("x" * 1000)],
                         ids=["memory", "recursion", "long message"])
def test_any_exception_decoding_one_record_rejects_that_record_alone(
        monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import workers.kafka.codecs as codecs

    real = codecs._decode_json

    def flaky(value: bytes, spec: CodecSpec):  # type: ignore[no-untyped-def]
        if b'"bad"' in value:
            raise error
        return real(value, spec)

    monkeypatch.setattr(codecs, "_decode_json", flaky)
    spec = CodecSpec(input_shape=(2,), num_classes=2)
    records = [_rec(json.dumps({"x": [1, 2], "y": 1, "id": i}).encode(), n) for n, i in enumerate(("a", "bad", "c"))]
    batch = decode_batch(records, spec)
    assert batch.targets.tolist() == [1, 1] and [r.record for r in batch.rejected] == [records[1]]
    reason = batch.rejected[0].reason
    assert reason.startswith(f"decoding raised {type(error).__name__}") and len(reason) < 260
    with pytest.raises(RecordRejected, match=type(error).__name__):
        decode_record(records[1], spec)


def test_keyboard_interrupt_while_decoding_is_not_a_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.kafka.codecs as codecs

    def interrupted(value: bytes, spec: CodecSpec):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(codecs, "_decode_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        decode_batch([_rec(b"{}")], CodecSpec(input_shape=(2,), num_classes=2))


def test_raw_chunk_rejects_a_record_whose_label_check_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    # The columnar path looks at a flagged record on its own; whatever that raises rejects only it.
    import workers.kafka.codecs as codecs

    real = codecs._label

    def label(rec: KafkaRecord, source: str, spec: CodecSpec) -> int:
        if rec.offset == 1:
            raise MemoryError
        return real(rec, source, spec)

    monkeypatch.setattr(codecs, "_label", label)
    spec = CodecSpec(format=RawFormat(dtype="float32"), input_shape=(1,), num_classes=10)
    one = np.array([1.0], "<f4").tobytes()
    chunk = _chunk([(0, 0, one, [("label", b"1")]), (0, 1, one, [("label", b"07")]), (0, 2, one, [("label", b"2")])])
    batch = decode_batch(chunk, spec)
    assert batch.targets.tolist() == [1, 2] and batch.rejected[0].record is chunk[1]
    assert batch.rejected[0].reason == "decoding raised MemoryError"


def test_raw_chunk_of_only_rejected_float_records_is_an_empty_batch() -> None:
    spec = CodecSpec(format=RawFormat(dtype="float32"), input_shape=(2,), num_classes=3)
    batch = decode_batch(_chunk([(0, 0, None, None), (0, 1, b"\x00", None)]), spec)
    assert len(batch) == 0 and batch.inputs.shape == (0, 2) and len(batch.rejected) == 2


def test_a_record_with_several_faults_gets_the_same_reason_on_both_paths() -> None:
    # Found by the fuzz test: non-finite features and a clean-label header that is not a number.
    spec = CodecSpec(format=RawFormat(dtype="float64", label_from="key"), input_shape=(3,), num_classes=5)
    bad = KafkaRecord("t", 0, 0, np.array([0.0, 0.0, np.inf]).astype("<f8").tobytes(), key=b"0",
                      headers=(("clean_label", b""),))
    columnar = decode_batch(RecordChunk.of_records([bad]), spec)  # type: ignore[arg-type]
    with pytest.raises(RecordRejected) as per_record:
        decode_record(bad, spec)
    assert [r.reason for r in columnar.rejected] == [per_record.value.reason]
    assert per_record.value.reason.startswith("clean label header is not an integer")


def test_decode_features_reads_a_value_without_its_label_and_agrees_with_decode_record() -> None:
    # What the service predicts on: a value alone. Its features are decode_record's, a json
    # value's y is optional and ignored, and every value check rejects with the same reason.
    json_spec = CodecSpec(input_shape=(2, 2), num_classes=3)
    labelled = json.dumps({"x": [[1, 2], [3, 4]], "y": 2}).encode()
    np.testing.assert_array_equal(decode_features(labelled, json_spec), decode_record(_rec(labelled), json_spec)[0])
    for value in (json.dumps({"x": [1, 2, 3, 4]}).encode(), json.dumps({"x": [1, 2, 3, 4], "y": "junk"}).encode()):
        x = decode_features(value, json_spec)
        assert x.dtype == np.float32 and x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    raw_spec = CodecSpec(format=RawFormat(dtype="uint8", scale=0.5), input_shape=(3,), num_classes=4)
    raw = bytes([2, 4, 6])
    np.testing.assert_array_equal(decode_features(raw, raw_spec), decode_record(_rec(raw, label=1), raw_spec)[0])
    image_spec = CodecSpec(format=ImageFormat(), input_shape=(3, 8, 8), num_classes=10)
    np.testing.assert_array_equal(decode_features(_png((8, 8)), image_spec),
                                  decode_record(_rec(_png((8, 8)), label=0), image_spec)[0])
    # json values carry a valid y so that decode_record's label check passes and the reasons compare.
    bad = [(json.dumps({"x": [1, 2, 3], "y": 1}).encode(), json_spec), (json.dumps({"y": 1}).encode(), json_spec),
           (b"{not json", json_spec), (json.dumps({"x": [1, 2, float("nan"), 4], "y": 1}).encode(), json_spec),
           (bytes([1, 2]), raw_spec), (None, raw_spec), (_png((9, 8)), image_spec), (b"\x89PNG junk", image_spec)]
    for value, spec in bad:
        with pytest.raises(RecordRejected) as features:
            decode_features(value, spec)
        with pytest.raises(RecordRejected) as record:
            decode_record(_rec(value, label=1), spec)
        assert features.value.reason == record.value.reason
    with pytest.raises(RecordRejected, match=r"invalid field\(s\): x"):
        decode_features(json.dumps({"y": 1}).encode(), json_spec)
