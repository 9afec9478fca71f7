"""KafkaSource when the world changed under a job: partitions missing from the checkpoint,
positions the broker no longer has (at resume and while reading), partitions added while it
runs, and bounded reads of transactional topics. Unit tests drive the source with a fake
client; the rest go through the embedded broker with both client libraries."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from workers.errors import OffsetOutOfRangeError
from workers.kafka.broker import EmbeddedBroker
from workers.kafka.clients import FetchOutOfRange, PartitionClient, TransientClientError, make_client
from workers.kafka.records import RecordChunk
from workers.kafka.source import KafkaSource, OffsetReset, SourceSpec

CLIENTS = ["confluent", "kafka-python"]
TOPIC = "t"


# --- a fake broker and client ------------------------------------------------------------------

@dataclass
class FakeTopic:
    """What the fake clients see: records per partition (offset -> value), each partition's range
    (offsets in it without a record are transaction markers), the partition count metadata
    reports, and changes applied at a given poll (retention, a recreated topic)."""

    logs: dict[int, dict[int, bytes]]
    low: dict[int, int]
    high: dict[int, int]
    visible: int
    metadata_down: bool = False
    at_poll: dict[int, Callable[[FakeTopic], None]] = field(default_factory=dict)
    polls: int = 0

    @classmethod
    def of(cls, partitions: int, records: int, *, visible: int | None = None) -> FakeTopic:
        logs = {p: {o: f"{p}:{o}".encode() for o in range(records)} for p in range(partitions)}
        return cls(logs, {p: 0 for p in logs}, {p: records for p in logs},
                   partitions if visible is None else visible)

    def delete_before(self, partition: int, offset: int) -> None:
        """Retention: the partition's records below ``offset`` are gone."""
        self.logs[partition] = {o: v for o, v in self.logs[partition].items() if o >= offset}
        self.low[partition] = offset

    def recreate(self, partition: int, records: int) -> None:
        """The partition starts over with fewer records."""
        self.logs[partition] = {o: f"{partition}:{o}:new".encode() for o in range(records)}
        self.low[partition], self.high[partition] = 0, records


class FakeClient:
    """A PartitionClient over a FakeTopic. Like a consumer with auto.offset.reset=error, it
    refuses (FetchOutOfRange) to fetch from a position outside its partition's range, and its
    position moves past transaction markers."""

    def __init__(self, topic: FakeTopic) -> None:
        self.topic = topic
        self.pos: dict[int, int] = {}
        self.closed = False

    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        if self.topic.metadata_down:
            raise TransientClientError("metadata request timed out")
        return list(range(self.topic.visible))

    def assign(self, topic: str, positions: dict[int, int]) -> None:
        self.pos = dict(positions)

    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]:
        return self.topic.low[partition], self.topic.high[partition]

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]:
        raise NotImplementedError

    def poll(self, max_records: int, timeout_s: float) -> RecordChunk:
        t = self.topic
        t.polls += 1
        if t.polls in t.at_poll:
            t.at_poll[t.polls](t)
        refused = {p: o for p, o in self.pos.items() if not t.low[p] <= o <= t.high[p]}
        if refused:
            raise FetchOutOfRange(f"offsets out of range: {refused}", refused)
        got: list[tuple[int, int, bytes]] = []
        for p in sorted(self.pos):
            o = self.pos[p]
            while o < t.high[p] and len(got) < max_records:
                if o in t.logs[p]:
                    got.append((p, o, t.logs[p][o]))
                o += 1  # past markers as well
            self.pos[p] = o
        if not got:
            time.sleep(0.002)
        return RecordChunk(TOPIC, [v for _, _, v in got], [p for p, _, _ in got], [o for _, o, _ in got])

    def position(self, topic: str, partition: int) -> int | None:
        return self.pos.get(partition)

    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        return self.topic.high[partition]

    def close(self) -> None:
        self.closed = True


def _spec(**kw) -> SourceSpec:  # type: ignore[no-untyped-def]
    return SourceSpec(**{"bootstrap_servers": "fake:9092", "topic": TOPIC, "max_wait_s": 0.01, **kw})


def _source(topic: FakeTopic, spec: SourceSpec, **kw) -> KafkaSource:  # type: ignore[no-untyped-def]
    return KafkaSource(spec, client_factory=lambda: FakeClient(topic), **kw)


def _drain(source: KafkaSource, limit_s: float = 20.0) -> list[tuple[int, int]]:
    """(partition, offset) of every record a bounded source hands out."""
    out, deadline = [], time.monotonic() + limit_s
    while time.monotonic() < deadline:
        batch = source.next_batch()
        if batch is None:
            return out
        out += [(r.partition, r.offset) for r in batch]
    raise AssertionError("bounded source did not finish")


def _take(source: KafkaSource, count: int, limit_s: float = 20.0) -> list[tuple[int, int]]:
    """(partition, offset) of the next ``count`` records an unbounded source hands out."""
    out, deadline = [], time.monotonic() + limit_s
    while len(out) < count:
        assert time.monotonic() < deadline, f"only {out} arrived"
        out += [(r.partition, r.offset) for r in source.next_batch() or []]
    return out


# --- resume: partitions missing from the checkpoint ---------------------------------------------

def test_resume_reads_partitions_missing_from_the_checkpoint_from_earliest() -> None:
    topic = FakeTopic.of(3, 6)
    topic.delete_before(2, 2)
    spec = _spec(start="latest", stop_at="end")
    with _source(topic, spec, resume_offsets={0: 4}) as source:
        got = _drain(source)
        assert source.positions == {0: 6, 1: 6, 2: 6}
    # Not 'latest' for 1 and 2: they were added after the checkpoint, all their records are new.
    assert sorted(got) == [(0, 4), (0, 5), *[(1, o) for o in range(6)], *[(2, o) for o in range(2, 6)]]
    with _source(topic, spec, resume_offsets={}) as source:  # a checkpoint listing nothing
        assert len(_drain(source)) == 6 + 6 + 4
    with _source(topic, spec) as source:  # a new job: the spec's start
        assert _drain(source) == [] and source.positions == {0: 6, 1: 6, 2: 6}


# --- resume: positions outside the broker's range ----------------------------------------------

@pytest.mark.parametrize("offset", [1, 50])  # deleted by retention; beyond a recreated topic's end
def test_resumed_offset_outside_the_range_fails_naming_it(offset: int) -> None:
    topic = FakeTopic.of(1, 10)
    topic.delete_before(0, 3)
    clients: list[FakeClient] = []

    def factory() -> PartitionClient:
        clients.append(FakeClient(topic))
        return clients[-1]

    source = KafkaSource(_spec(), resume_offsets={0: offset}, client_factory=factory)
    with pytest.raises(OffsetOutOfRangeError, match=rf"t\[0\]: resumed offset {offset} is outside the broker's "
                                                    r"range \[3, 10\].*offset_reset"):
        source.start()
    assert clients[0].closed


@pytest.mark.parametrize(("offset", "policy", "reset_to", "says"), [
    (1, "earliest", 3, "records [1, 3) were deleted before they were read"),
    (1, "latest", 10, "[3, 10) are skipped"),
    (50, "earliest", 3, "the partition now ends at 10 (recreated or truncated); its records [3, 10) are read"),
    (50, "latest", 10, "its records [3, 10) are skipped"),
])
def test_resumed_offset_outside_the_range_resets_per_policy(offset: int, policy: str, reset_to: int, says: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    topic = FakeTopic.of(2, 10)
    topic.delete_before(0, 3)
    with (caplog.at_level(logging.WARNING, logger="workers.kafka.source"),
          _source(topic, _spec(stop_at="end", offset_reset=policy), resume_offsets={0: offset, 1: 7}) as source):
        assert source.positions == {0: reset_to, 1: 7}  # what a checkpoint taken now would store
        got = _drain(source)
        assert source.offset_resets == [OffsetReset(0, offset, 3, 10, reset_to, "resume")]
    assert sorted(got) == [(0, o) for o in range(reset_to, 10)] + [(1, 7), (1, 8), (1, 9)]
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"t[0]: resumed offset {offset} is outside the broker's range [3, 10]" in warning and says in warning


# --- positions the broker refuses while the job reads --------------------------------------------

def test_fetch_refused_while_reading_fails_with_the_typed_error() -> None:
    topic = FakeTopic.of(1, 10)
    topic.at_poll[2] = lambda t: t.delete_before(0, 8)  # retention passes the reader after 0 and 1
    with (_source(topic, _spec(fetch_records=2, queue_records=2, batch_size=2)) as source,
          pytest.raises(OffsetOutOfRangeError,
                        match=r"t\[0\]: fetch offset 2 is outside the broker's range \[8, 10\]")):
        for _ in range(2000):
            source.next_batch()


@pytest.mark.parametrize(("policy", "change", "expected", "end"), [
    ("earliest", lambda t: t.delete_before(0, 8), [0, 1, 8, 9], 10),  # records 2-7 deleted unread
    ("latest", lambda t: t.delete_before(0, 8), [0, 1], 10),  # 8 and 9 skipped as well
    ("earliest", lambda t: t.recreate(0, 1), [0, 1, 0], 1),  # the position moves back
])
def test_fetch_refused_while_reading_resets_per_policy(policy: str, change: Callable[[FakeTopic], None],
                                                       expected: list[int], end: int) -> None:
    topic = FakeTopic.of(1, 10)
    topic.at_poll[2] = change
    with _source(topic, _spec(fetch_records=2, queue_records=2, batch_size=2, offset_reset=policy)) as source:
        got = _take(source, len(expected))
        # Nothing more comes, and the position follows the reset even when no record came after it.
        deadline = time.monotonic() + 5
        while source.positions[0] != end and time.monotonic() < deadline:
            got += [(r.partition, r.offset) for r in source.next_batch() or []]
        assert source.positions == {0: end}
        assert [reset.when for reset in source.offset_resets] == ["fetch"]
        assert source.offset_resets[0].offset == 2 and source.offset_resets[0].reset_to == (
            topic.low[0] if policy == "earliest" else topic.high[0])
    assert got == [(0, o) for o in expected]


# --- stop_at: end past transaction markers --------------------------------------------------------

def test_bounded_source_finishes_past_transaction_markers() -> None:
    # Two transactions of 3 records, each closed by a commit marker: offsets 3 and 7 hold no record,
    # and the last record's next offset (6) never reaches the end snapshot (8).
    topic = FakeTopic.of(2, 8)
    for marker in (3, 7):
        del topic.logs[0][marker]
    with _source(topic, _spec(stop_at="end")) as source:
        got = _drain(source, limit_s=5)
        assert source.positions == {0: 7, 1: 8}
    assert sorted(got) == [(0, o) for o in (0, 1, 2, 4, 5, 6)] + [(1, o) for o in range(8)]


# --- partitions added while the job runs ---------------------------------------------------------

def test_add_partitions_adopts_this_ranks_new_partitions_from_earliest() -> None:
    topic = FakeTopic.of(5, 3, visible=2)
    topic.delete_before(2, 1)
    sources = [_source(topic, _spec(), rank=r, world_size=2).start() for r in range(2)]
    try:
        firsts = [sorted(_take(s, 3)) for s in sources]
        assert firsts == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
        assert [s.topic_partition_count() for s in sources] == [2, 2]
        topic.visible = 5
        assert [s.topic_partition_count() for s in sources] == [5, 5]
        assert [s.add_partitions(5) for s in sources] == [[2, 4], [3]]
        assert [s.add_partitions(5) for s in sources] == [[], []] and sources[0].partition_count == 5
        assert 2 not in sources[0].positions  # adopted, not read yet: a resume reads it from earliest
        assert sorted(_take(sources[0], 5)) == [(2, 1), (2, 2), (4, 0), (4, 1), (4, 2)]
        assert sorted(_take(sources[1], 3)) == [(3, 0), (3, 1), (3, 2)]
        assert sources[0].positions == {0: 3, 2: 3, 4: 3} and sources[0].partitions == [0, 2, 4]
    finally:
        for s in sources:
            s.close()


def test_bounded_source_reads_adopted_partitions_to_their_end() -> None:
    topic = FakeTopic.of(2, 4, visible=1)
    with _source(topic, _spec(stop_at="end")) as source:
        topic.visible = 2
        assert source.add_partitions(source.topic_partition_count() or 0) == [1]
        assert sorted(_drain(source)) == [(p, o) for p in (0, 1) for o in range(4)]
        assert source.end_offsets == {0: 4, 1: 4}
        # Finished: a partition appearing now is not read (and the caller hears so).
        assert source.add_partitions(3) == [] and source.partition_count == 3


def test_partition_count_is_none_while_metadata_does_not_answer() -> None:
    topic = FakeTopic.of(1, 1)
    with _source(topic, _spec()) as source:
        topic.metadata_down = True
        assert source.topic_partition_count() is None
        topic.metadata_down = False
        assert source.topic_partition_count() == 1


# --- through the embedded broker -----------------------------------------------------------------

def _topic(bootstrap: str, partitions: int, records: int) -> str:
    """A topic whose records are produced in batches: the embedded broker's high watermark then
    trails the true end (last batch's base offset + 1)."""
    name = f"res-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[name].result(timeout=10)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50})
    for i in range(records):
        producer.produce(name, value=str(i).encode(), partition=i % partitions)
    assert producer.flush(10) == 0
    return name


def _broker_spec(broker: EmbeddedBroker, topic: str, client: str, **kw) -> SourceSpec:  # type: ignore[no-untyped-def]
    return SourceSpec(bootstrap_servers=broker.bootstrap, topic=topic, client=client,  # type: ignore[arg-type]
                      max_wait_s=0.05, **kw)


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_resume_reads_a_partition_missing_from_the_checkpoint_from_earliest(
        kafka_broker: EmbeddedBroker, client: str) -> None:
    topic = _topic(kafka_broker.bootstrap, 2, 20)
    spec = _broker_spec(kafka_broker, topic, client, start="latest", stop_at="end")
    with KafkaSource(spec, resume_offsets={0: 7}) as source:
        got = _drain(source)
        assert source.positions == {0: 10, 1: 10}
    assert sorted(got) == [(0, 7), (0, 8), (0, 9)] + [(1, o) for o in range(10)]


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_resume_beyond_the_end_fails_or_resets(kafka_broker: EmbeddedBroker, client: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    topic = _topic(kafka_broker.bootstrap, 1, 10)
    with pytest.raises(OffsetOutOfRangeError, match=rf"{topic}\[0\]: resumed offset 10000 is outside the "
                                                    r"broker's range \[0, 10\]"):
        KafkaSource(_broker_spec(kafka_broker, topic, client), resume_offsets={0: 10_000}).start()
    # The true end is in range, though the broker reports a high watermark below it.
    with KafkaSource(_broker_spec(kafka_broker, topic, client, stop_at="end"), resume_offsets={0: 10}) as source:
        assert _drain(source) == [] and source.positions == {0: 10} and source.offset_resets == []
    with caplog.at_level(logging.WARNING, logger="workers.kafka.source"):
        spec = _broker_spec(kafka_broker, topic, client, stop_at="end", offset_reset="earliest")
        with KafkaSource(spec, resume_offsets={0: 10_000}) as source:
            got = _drain(source)
            assert source.offset_resets == [OffsetReset(0, 10_000, 0, 10, 0, "resume")]
    assert got == [(0, o) for o in range(10)]
    assert any(f"{topic}[0]: resumed offset 10000" in r.getMessage() and "continuing at 0" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_bounded_resume_past_a_trailing_watermark_reads_to_the_true_end(kafka_broker: EmbeddedBroker,
                                                                              client: str) -> None:
    # One producer batch: the embedded broker reports the high watermark as 1 (the batch's base
    # offset + 1). A job resumed at 192 once took 192 >= 1 for "at the end" on its first empty
    # fetch and finished without reading 192..479 (seen in a stop-and-resume job test).
    name = f"res-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(timeout=10)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "linger.ms": 200})
    for i in range(480):
        producer.produce(name, value=str(i).encode(), partition=0)
    assert producer.flush(10) == 0
    with KafkaSource(_broker_spec(kafka_broker, name, client, stop_at="end"), resume_offsets={0: 192}) as source:
        assert source.end_offsets == {0: 480}
        assert _drain(source) == [(0, o) for o in range(192, 480)]


class _HidingClient:
    """A real client whose metadata shows only the first ``visible[0]`` partitions: the embedded
    broker (Tansu 0.6) does not implement CreatePartitions, so growth is shown this way."""

    def __init__(self, inner: PartitionClient, visible: list[int]) -> None:
        self._inner, self._visible = inner, visible

    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        return [p for p in self._inner.partitions(topic, timeout_s) if p < self._visible[0]]

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._inner, name)


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_partitions_added_while_running_are_adopted(kafka_broker: EmbeddedBroker, client: str) -> None:
    topic = _topic(kafka_broker.bootstrap, 4, 40)
    visible = [2]
    spec = _broker_spec(kafka_broker, topic, client)
    with KafkaSource(spec, client_factory=lambda: _HidingClient(
            make_client(spec.client, spec.bootstrap_servers, "cicw", {}), visible)) as source:  # type: ignore[arg-type]
        first = _take(source, 20)
        assert source.topic_partition_count() == 2
        visible[0] = 4
        assert source.topic_partition_count() == 4
        assert source.add_partitions(4) == [2, 3]
        second = _take(source, 20)
        assert source.positions == {p: 10 for p in range(4)}
    assert sorted(first) == [(p, o) for p in (0, 1) for o in range(10)]
    assert sorted(second) == [(p, o) for p in (2, 3) for o in range(10)]


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_bounded_read_of_a_transactional_topic_finishes(kafka_broker: EmbeddedBroker, client: str) -> None:
    name = f"txn-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(timeout=10)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "transactional.id": name})
    producer.init_transactions(10)
    for t in range(2):  # each commit writes a marker after its records: offsets 3 and 7
        producer.begin_transaction()
        for i in range(3):
            producer.produce(name, value=f"{t}-{i}".encode(), partition=0)
        producer.commit_transaction(10)
    with KafkaSource(_broker_spec(kafka_broker, name, client, stop_at="end")) as source:
        assert source.end_offsets == {0: 8}
        got = _drain(source)
        assert source.positions == {0: 7}
    assert got == [(0, o) for o in (0, 1, 2, 4, 5, 6)]
