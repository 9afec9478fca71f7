"""The narrow Kafka client interface the source needs, with two backends: confluent-kafka
(default, ~50x faster here) and kafka-python (pure Python). Both use assign(), never
consumer-group subscription, so no rebalances; settings such as SASL/SSL pass through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np

from .records import RecordChunk
from ..errors import SourceClientError, TransientClientError

ClientName = Literal["confluent", "kafka-python"]

# Consumer settings the confluent backend starts from (job settings override them).
CONFLUENT_DEFAULTS: dict[str, object] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    # When librdkafka's prefetch queue is full (the job reads slower than the broker sends),
    # it pauses fetching for this long; at the default 1 s a reader that then drains the
    # 64 MB queue in 0.2 s (300k+ records/s of 800 bytes) sat idle for the rest of the second.
    "fetch.queue.backoff.ms": 50,
    # How long a broker may hold a fetch waiting for data. Kafka answers as soon as records
    # arrive, but the embedded broker (Tansu) holds every fetch this long, so librdkafka's 500 ms
    # set the produce-to-step latency there (p50 ~240 ms at 10k records/s; ~47 ms at 50 ms, see
    # BENCHMARKS.md). 100 ms costs an idle consumer a few more fetch requests per second.
    "fetch.wait.max.ms": 100,
}

# Messages asked of confluent-kafka per consume() call (see ConfluentClient.poll).
CONSUME_BATCH = 256


class PartitionClient(Protocol):
    def partitions(self, topic: str, timeout_s: float) -> list[int]: ...
    def assign(self, topic: str, positions: Mapping[int, int]) -> None: ...
    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]: ...
    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]: ...
    def poll(self, max_records: int, timeout_s: float) -> RecordChunk:
        """Up to ``max_records`` records of the assigned partitions, in fetch order."""
    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        """The high watermark the last fetch response carried (no request); None if unknown."""
    def close(self) -> None: ...


def make_client(name: ClientName, bootstrap: str, group_id: str, config: Mapping[str, str],
                *, timeout_s: float = 10.0) -> PartitionClient:
    if name == "confluent":
        return ConfluentClient(bootstrap, group_id, config)
    if name == "kafka-python":
        return KafkaPythonClient(bootstrap, group_id, config, timeout_s=timeout_s)
    raise ValueError(f"client must be 'confluent' or 'kafka-python', got {name!r}")


class ConfluentClient:
    def __init__(self, bootstrap: str, group_id: str, config: Mapping[str, str]) -> None:
        from confluent_kafka import Consumer, Message

        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id,
                                   **CONFLUENT_DEFAULTS, **config})
        self._message = Message
        self._message_error = Message.error
        self._topic = ""
        self._pending_error: TransientClientError | None = None

    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        from confluent_kafka import KafkaException

        try:
            meta = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        except KafkaException as exc:
            raise SourceClientError(f"cannot read metadata of topic {topic!r}: {exc}") from exc
        if meta is None or meta.error is not None or not meta.partitions:
            raise SourceClientError(f"topic {topic!r} does not exist or has no partitions"
                                    + (f" ({meta.error})" if meta is not None and meta.error else ""))
        return sorted(meta.partitions)

    def assign(self, topic: str, positions: Mapping[int, int]) -> None:
        from confluent_kafka import TopicPartition

        self._topic = topic
        self._consumer.assign([TopicPartition(topic, p, o) for p, o in positions.items()])

    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
        except KafkaException as exc:
            raise TransientClientError(f"cannot read watermarks of {topic}[{partition}]: {exc}") from exc
        return int(low), int(high)

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]:
        from confluent_kafka import TopicPartition

        found = self._consumer.offsets_for_times([TopicPartition(topic, p, timestamp_ms) for p in partitions],
                                                 timeout=timeout_s)
        # -1: no record at or after the timestamp yet; start at the end.
        return {tp.partition: (tp.offset if tp.offset >= 0 else self.watermarks(topic, tp.partition, timeout_s)[1])
                for tp in found}

    def poll(self, max_records: int, timeout_s: float) -> RecordChunk:
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        # At most CONSUME_BATCH Message objects exist at a time: the garbage collector tracks
        # them, and many alive at once get promoted to its oldest generation and set off full
        # passes (several times more of them with 10,000 per call here).
        parts: list[RecordChunk] = []
        got, timeout = 0, timeout_s
        while got < max_records:
            want = min(max_records - got, CONSUME_BATCH)
            try:
                part, fetched = self._consume(want, timeout)
            except TransientClientError as exc:
                if not parts:
                    raise
                self._pending_error = exc  # hand out what was fetched before it first
                break
            parts.append(part)
            got += len(part)
            if fetched < want or self._pending_error is not None:
                break
            timeout = 0.0  # more only if librdkafka already holds it
        return RecordChunk.concat(parts, self._topic)

    def _consume(self, max_records: int, timeout_s: float) -> tuple[RecordChunk, int]:
        """The records of one consume() call, and how many messages and events it returned."""
        messages = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        fetched = len(messages)
        # Error events are rare: one pass at C speed finds whether any is there at all.
        if any(map(self._message_error, messages)):
            messages = self._without_errors(messages)
        # A column at a time, each in the form measured cheapest here, then the Message objects
        # go (see poll). The header tuples hold only str and bytes, so the collector stops
        # tracking them at its first pass.
        n, msg = len(messages), self._message
        return RecordChunk(self._topic, [m.value() for m in messages],
                           np.fromiter(map(msg.partition, messages), np.int64, n),
                           np.fromiter(map(msg.offset, messages), np.int64, n),
                           [m.key() for m in messages],
                           [tuple(h) if (h := m.headers()) else None for m in messages],
                           [ts if kind else -1 for kind, ts in map(msg.timestamp, messages)]), fetched

    def _without_errors(self, messages: list[Any]) -> list[Any]:
        from confluent_kafka import KafkaError

        kept, transient = [], None
        for m in messages:
            err = m.error()
            if err is None:
                kept.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:  # informational, not a failure
                continue
            elif err.fatal():
                raise SourceClientError(f"fetch failed: {err}")
            elif transient is None:  # librdkafka reconnects and retries by itself
                transient = TransientClientError(f"fetch failed: {err}")
        if transient is not None:
            if not kept:
                raise transient
            # The consumer has moved past the records fetched with the error: hand them out
            # now and report the error on the next poll, or they would be lost until a restart.
            self._pending_error = transient
        return kept

    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        from confluent_kafka import TopicPartition

        high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)[1]
        return int(high) if high >= 0 else None

    def close(self) -> None:
        self._consumer.close()


class KafkaPythonClient:
    def __init__(self, bootstrap: str, group_id: str, config: Mapping[str, str], *,
                 timeout_s: float = 10.0) -> None:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        settings: dict[str, object] = {"bootstrap_timeout_ms": int(timeout_s * 1000), **dict(config)}
        try:
            self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id,
                                           enable_auto_commit=False, auto_offset_reset="earliest",
                                           **settings)
        except KafkaError as exc:  # NoBrokersAvailable when nothing answers at bootstrap
            raise SourceClientError(f"cannot reach Kafka at {bootstrap}: {exc!r}") from exc
        self._topic = ""

    def _tp(self, topic: str, partition: int):  # type: ignore[no-untyped-def]
        from kafka import TopicPartition

        return TopicPartition(topic, partition)

    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        from kafka.errors import KafkaError

        try:
            parts = self._consumer.partitions_for_topic(topic)
        except KafkaError as exc:
            raise SourceClientError(f"cannot read metadata of topic {topic!r}: {exc}") from exc
        if not parts:
            raise SourceClientError(f"topic {topic!r} does not exist or has no partitions")
        return sorted(parts)

    def assign(self, topic: str, positions: Mapping[int, int]) -> None:
        self._topic = topic
        tps = {p: self._tp(topic, p) for p in positions}
        self._consumer.assign(list(tps.values()))
        for p, offset in positions.items():
            self._consumer.seek(tps[p], offset)

    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]:
        from kafka.errors import KafkaError

        tp = self._tp(topic, partition)
        try:
            low = self._consumer.beginning_offsets([tp], timeout_ms=int(timeout_s * 1000))[tp]
            high = self._consumer.end_offsets([tp], timeout_ms=int(timeout_s * 1000))[tp]
        except KafkaError as exc:  # KafkaTimeoutError while the broker does not answer
            raise TransientClientError(f"cannot read watermarks of {topic}[{partition}]: {exc!r}") from exc
        return int(low), int(high)

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]:
        tps = [self._tp(topic, p) for p in partitions]
        found = self._consumer.offsets_for_times({tp: timestamp_ms for tp in tps})
        return {tp.partition: (found[tp].offset if found.get(tp) is not None
                               else self.watermarks(topic, tp.partition, timeout_s)[1]) for tp in tps}

    def poll(self, max_records: int, timeout_s: float) -> RecordChunk:
        from kafka.errors import KafkaError

        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            if getattr(exc, "retriable", False):
                raise TransientClientError(f"fetch failed: {exc!r}") from exc
            raise SourceClientError(f"fetch failed: {exc!r}") from exc
        got = [r for records in batches.values() for r in records]
        return RecordChunk(self._topic, [r.value for r in got], np.array([r.partition for r in got], dtype=np.int64),
                           np.array([r.offset for r in got], dtype=np.int64), [r.key for r in got],
                           [r.headers for r in got],
                           [r.timestamp if r.timestamp is not None else -1 for r in got])

    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        return self._consumer.highwater(self._tp(topic, partition))

    def close(self) -> None:
        self._consumer.close()
