"""KafkaSource against the real broker: assignment, exactly-once coverage, start positions and
exact positions however batches cut the fetched chunks, bounded memory and a clear error when
nothing answers; the confluent client's columns and its handling of errors fetched with records,
and both clients' report of offsets the broker refuses."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from workers.errors import OffsetOutOfRangeError
from workers.kafka.broker import EmbeddedBroker, free_port
from workers.kafka.clients import (
    CONFLUENT_DEFAULTS,
    CONSUME_BATCH,
    ConfluentClient,
    FetchOutOfRange,
    KafkaPythonClient,
    SourceClientError,
    TransientClientError,
)
from workers.kafka.records import KafkaRecord
from workers.kafka.source import KafkaSource, SourceSpec, StartAtOffsets, StartAtTimestamp, assigned_partitions

CLIENTS = ["confluent", "kafka-python"]


def _topic(bootstrap: str, partitions: int, records: int, *, timestamp_ms: int | None = None,
           one_per_batch: bool = False) -> str:
    name = f"src-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(timeout=10)
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(records):
        kwargs = {"timestamp": timestamp_ms + i} if timestamp_ms is not None else {}
        producer.produce(name, value=str(i).encode(), partition=i % partitions, **kwargs)
        if one_per_batch:
            # The embedded broker (Tansu 0.6) reports the high watermark as the last batch's
            # base offset + 1; one record per batch keeps "latest" exact for this test.
            producer.flush(10)
    assert producer.flush(10) == 0
    return name


def _drain(source: KafkaSource, limit_s: float = 30.0) -> list:
    out, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        batch = source.next_batch()
        if batch is None:
            return out
        assert len(batch) <= source.spec.batch_size
        out.extend(batch)
    raise AssertionError("bounded source did not finish")


def test_assignment_is_rank_affine() -> None:
    assert assigned_partitions([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert assigned_partitions([0], 1, 2) == []
    with pytest.raises(ValueError, match="rank"):
        assigned_partitions([0], 2, 2)


@pytest.mark.parametrize("client", CLIENTS)
def test_two_ranks_cover_every_record_exactly_once(kafka_broker: EmbeddedBroker, client: str) -> None:
    topic = _topic(kafka_broker.bootstrap, 5, 1000)  # not divisible by the worker count
    spec = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, client=client,  # type: ignore[arg-type]
                      stop_at="end", batch_size=64)
    seen = []
    for rank in range(2):
        with KafkaSource(spec, rank=rank, world_size=2) as source:
            records = _drain(source)
            assert {r.partition for r in records} == set(assigned_partitions(list(range(5)), rank, 2))
            assert source.positions == {p: 200 for p in source.partitions}  # next offsets, per partition
            seen += records
    assert sorted(int(r.value) for r in seen) == list(range(1000))


@pytest.mark.parametrize("client", CLIENTS)
def test_start_positions_and_resume(kafka_broker: EmbeddedBroker, client: str) -> None:
    t0 = 1_700_000_000_000
    topic = _topic(kafka_broker.bootstrap, 2, 100, timestamp_ms=t0, one_per_batch=True)
    base = dict(bootstrap_servers=kafka_broker.bootstrap, topic=topic, client=client, stop_at="end")

    def values(**kw) -> list[int]:  # type: ignore[no-untyped-def]
        resume = kw.pop("resume", None)
        with KafkaSource(SourceSpec(**base, **kw), resume_offsets=resume) as s:
            return sorted(int(r.value) for r in _drain(s))

    assert values(start="latest") == []
    assert values(start=StartAtOffsets(offsets={0: 45})) == sorted([90, 92, 94, 96, 98, *range(1, 100, 2)])
    assert values(start=StartAtTimestamp(timestamp_ms=t0 + 90)) == list(range(90, 100))
    # records older than the start time are consumed, not returned: a checkpoint moves past them
    with KafkaSource(SourceSpec(**base, start=StartAtTimestamp(timestamp_ms=t0 + 10_000))) as s:
        assert _drain(s) == [] and s.positions == {0: 50, 1: 50}
    # checkpoint offsets win over the configured start
    assert values(start="latest", resume={0: 48, 1: 49}) == [96, 98, 99]


def test_rank_without_partitions_keeps_pace(kafka_broker: EmbeddedBroker) -> None:
    topic = _topic(kafka_broker.bootstrap, 1, 5)
    spec = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, max_wait_s=0.05)
    with KafkaSource(spec, rank=1, world_size=2) as source:
        assert source.partitions == []
        start = time.monotonic()
        assert source.next_batch() == [] and time.monotonic() - start >= 0.04  # waits, does not spin
    bounded = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, stop_at="end")
    with KafkaSource(bounded, rank=1, world_size=2) as source:
        assert source.next_batch() is None


def test_buffer_is_bounded(kafka_broker: EmbeddedBroker) -> None:
    topic = _topic(kafka_broker.bootstrap, 1, 500)
    spec = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, queue_records=20,
                      fetch_records=50, batch_size=10)
    with KafkaSource(spec) as source:
        time.sleep(1.0)  # the poller runs ahead as far as the queue allows, no further
        buffered = sum(len(chunk) for chunk in list(source._queue.queue))
        assert buffered <= max(spec.queue_records, spec.fetch_records)
        got = []
        while len(got) < 500:
            got += source.next_batch() or []
        assert [int(r.value) for r in got] == list(range(500))


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_broker_fails_fast_with_a_clear_error(client: str) -> None:
    spec = SourceSpec(bootstrap_servers=f"127.0.0.1:{free_port()}", topic="x", client=client,  # type: ignore[arg-type]
                      metadata_timeout_s=2.0,
                      client_config={"socket.connection.setup.timeout.ms": "1000"} if client == "confluent" else {})
    start = time.monotonic()
    with pytest.raises(SourceClientError, match="cannot"):
        KafkaSource(spec).start()
    assert time.monotonic() - start < 30


def _wait_for(condition, limit_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_outage_is_reported_as_a_stall_and_reading_resumes(client: str) -> None:
    # A broker of its own: this test freezes it.
    with EmbeddedBroker() as broker:
        topic = _topic(broker.bootstrap, 2, 40, one_per_batch=True)
        spec = SourceSpec(bootstrap_servers=broker.bootstrap, topic=topic, client=client,  # type: ignore[arg-type]
                          batch_size=100, max_wait_s=0.05, health_check_s=0.2, metadata_timeout_s=1.0)
        with KafkaSource(spec) as source:
            # Before anything is handed out, the health check's end offsets give the lag.
            _wait_for(lambda: source.lag() == 40)
            got: list = []
            _wait_for(lambda: got.extend(source.next_batch() or []) or len(got) == 40)
            assert source.lag() == 0 and source.stalled_for() == 0.0 and source.trouble is None
            broker.pause()
            try:
                _wait_for(lambda: source.next_batch() == [] and source.stalled_for() > 0.5)
                assert source.trouble is not None
            finally:
                broker.resume()
            producer = Producer({"bootstrap.servers": broker.bootstrap})
            producer.produce(topic, value=b"40", partition=0)
            assert producer.flush(10) == 0
            _wait_for(lambda: got.extend(source.next_batch() or []) or len(got) == 41)
            _wait_for(lambda: source.stalled_for() == 0.0)
    assert sorted(int(r.value) for r in got) == list(range(41))


@pytest.mark.parametrize("client", CLIENTS)
def test_positions_stay_exact_when_batches_cut_across_fetches(kafka_broker: EmbeddedBroker, client: str) -> None:
    # Batches of 5 cut from fetches of 7 records over 3 partitions: after every batch each
    # partition's position is one past the last record of it handed out so far.
    topic = _topic(kafka_broker.bootstrap, 3, 90)
    spec = SourceSpec(bootstrap_servers=kafka_broker.bootstrap, topic=topic, client=client,  # type: ignore[arg-type]
                      stop_at="end", batch_size=5, fetch_records=7, queue_records=14)
    seen: list = []
    ready_seen = 0
    with KafkaSource(spec) as source:
        expected = dict(source.positions)
        while True:
            ready = source.batch_ready()  # a whole batch is buffered: the next one is cut without waiting
            if (batch := source.next_batch()) is None:
                break
            assert len(batch) <= 5 and (not ready or len(batch) == 5)
            ready_seen += ready
            for r in batch:
                assert r.offset == expected[r.partition]  # in order, nothing skipped or repeated
                expected[r.partition] = r.offset + 1
            assert source.positions == expected
            seen += batch
    assert sorted(int(r.value) for r in seen) == list(range(90)) and expected == {0: 30, 1: 30, 2: 30}
    assert ready_seen  # what is left of a fetch of 7 holds a batch of 5 now and then


class _FakeConsumer:
    """Hands out prepared confluent_kafka Message lists, honouring num_messages."""

    def __init__(self, messages: list) -> None:  # type: ignore[type-arg]
        self.messages, self.calls = messages, []  # type: ignore[var-annotated]

    def consume(self, num_messages: int, timeout: float) -> list:  # type: ignore[type-arg]
        self.calls.append((num_messages, timeout))
        out, self.messages = self.messages[:num_messages], self.messages[num_messages:]
        return out


def _confluent_client(messages: list) -> ConfluentClient:  # type: ignore[type-arg]
    client = ConfluentClient(f"127.0.0.1:{free_port()}", "g", {})
    client.assign("t", {})
    client._consumer.close()
    client._consumer = _FakeConsumer(messages)  # type: ignore[assignment]
    return client


def test_confluent_poll_builds_columns_and_keeps_records_fetched_with_an_error() -> None:
    def msg(p: int, o: int, **kw) -> Message:  # type: ignore[no-untyped-def]
        return Message(topic="t", partition=p, offset=o, value=f"{p}:{o}".encode(), **kw)

    good = [msg(0, i, headers=[("label", b"1"), ("x", None)], timestamp=(1, 500 + i)) for i in range(600)]
    eof = Message(topic="t", partition=1, offset=7, error=KafkaError(KafkaError._PARTITION_EOF))
    down = Message(topic="t", partition=1, offset=7, error=KafkaError(KafkaError._TRANSPORT))
    client = _confluent_client([*good[:300], eof, *good[300:], down, msg(1, 8)])
    chunk = client.poll(1000, 0.5)
    # consume() is asked for at most CONSUME_BATCH at a time; only the first call waits.
    assert [n for n, _ in client._consumer.calls] == [CONSUME_BATCH, CONSUME_BATCH, CONSUME_BATCH]
    assert [t for _, t in client._consumer.calls] == [0.5, 0.0, 0.0]
    # The records fetched with the transient error, before and after it, are handed out (the
    # consumer has moved past them); the error comes with the next poll.
    assert [(r.partition, r.offset) for r in chunk] == [(0, i) for i in range(600)] + [(1, 8)]
    assert chunk[3] == KafkaRecord("t", 0, 3, b"0:3", None, (("label", b"1"), ("x", b"")), 503)
    assert chunk[600].timestamp_ms is None and chunk.last_offsets() == {0: 599, 1: 8}
    with pytest.raises(TransientClientError, match="fetch failed"):
        client.poll(1000, 0.5)
    assert client.poll(1000, 0.5) == []
    fatal = KafkaError(KafkaError._FATAL, fatal=True)
    with pytest.raises(SourceClientError, match="fetch failed") as failed:
        _confluent_client([msg(0, 0), Message(topic="t", partition=0, offset=1, error=fatal)]).poll(10, 0.1)
    assert not isinstance(failed.value, TransientClientError)


def test_confluent_client_reports_refused_offsets_after_the_records_fetched_with_them() -> None:
    # auto.offset.reset=error: librdkafka reports a position the broker no longer has as an
    # error event for that partition instead of silently moving to the earliest offset.
    assert CONFLUENT_DEFAULTS["auto.offset.reset"] == "error"
    refused = Message(topic="t", partition=1, offset=40, error=KafkaError(KafkaError._AUTO_OFFSET_RESET))
    client = _confluent_client([Message(topic="t", partition=0, offset=5, value=b"a"), refused,
                                Message(topic="t", partition=0, offset=6, value=b"b")])
    assert [(r.partition, r.offset) for r in client.poll(10, 0.1)] == [(0, 5), (0, 6)]
    with pytest.raises(FetchOutOfRange) as out:
        client.poll(10, 0.1)
    assert out.value.offsets == {1: 40} and isinstance(out.value, OffsetOutOfRangeError)
    broker_says = Message(topic="t", partition=2, offset=7, error=KafkaError(KafkaError.OFFSET_OUT_OF_RANGE))
    with pytest.raises(FetchOutOfRange) as out:
        _confluent_client([broker_says]).poll(10, 0.1)
    assert out.value.offsets == {2: 7}


def test_kafka_python_client_reports_refused_offsets() -> None:
    from kafka import TopicPartition
    from kafka.errors import OffsetOutOfRangeError as KafkaOffsetOutOfRange

    class Refusing:
        def poll(self, timeout_ms: int, max_records: int) -> dict:  # type: ignore[type-arg]
            raise KafkaOffsetOutOfRange({TopicPartition("t", 3): 12})

    client = KafkaPythonClient.__new__(KafkaPythonClient)  # no broker: only poll is exercised
    client._consumer, client._topic = Refusing(), "t"  # type: ignore[assignment]
    with pytest.raises(FetchOutOfRange) as out:
        client.poll(10, 0.1)
    assert out.value.offsets == {3: 12}
