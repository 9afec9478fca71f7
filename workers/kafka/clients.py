"""The narrow Kafka client interface the source needs, with two backends: confluent-kafka
(default, ~50x faster here) and kafka-python (pure Python). Both use assign(), never
consumer-group subscription, so no rebalances; settings such as SASL/SSL pass through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np

from ..errors import OffsetOutOfRangeError, SourceClientError, TransientClientError
from .records import RecordChunk

ClientName = Literal["confluent", "kafka-python"]

# Consumer settings the confluent backend starts from (job settings override them).
CONFLUENT_DEFAULTS: dict[str, object] = {
    "enable.auto.commit": False,
    # A position the broker no longer has surfaces as an error (FetchOutOfRange) instead of a
    # silent jump: "earliest" here retrained a whole log after retention passed the job by. The
    # source applies the job's own policy (SourceSpec.offset_reset).
    "auto.offset.reset": "error",
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


class FetchOutOfRange(OffsetOutOfRangeError):
    """The broker refused to fetch from these positions (partition -> offset): they are outside
    the partition's range. Raised by ``poll``; the source resets or fails per its policy."""

    def __init__(self, message: str, offsets: Mapping[int, int] | None = None) -> None:
        super().__init__(message)
        self.offsets = dict(offsets or {})

    def __reduce__(self):
        return type(self), (str(self), self.offsets)


class PartitionClient(Protocol):
    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        """The topic's partitions per a fresh metadata request (sorted)."""
    def assign(self, topic: str, positions: Mapping[int, int]) -> None: ...
    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]: ...
    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]: ...
    def poll(self, max_records: int, timeout_s: float) -> RecordChunk:
        """Up to ``max_records`` records of the assigned partitions, in fetch order. Raises
        FetchOutOfRange for positions the broker no longer has (after handing out the records
        fetched before the error), TransientClientError for failures the client retries."""
    def position(self, topic: str, partition: int) -> int | None:
        """The consumer's next offset for an assigned partition (no request): one past the last
        record returned, and past transaction markers and aborted records the fetch skipped;
        None before the consumer knows it."""
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
        self._pending_error: SourceClientError | None = None

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
            except (TransientClientError, FetchOutOfRange) as exc:
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
                           [tuple(h) if (h := m.headers()) else None for m in messages],  # type: ignore[arg-type]  # a list here
                           [ts if kind else -1 for kind, ts in map(msg.timestamp, messages)]), fetched

    def _without_errors(self, messages: list[Any]) -> list[Any]:
        from confluent_kafka import KafkaError

        kept, transient, out_of_range = [], None, {}
        for m in messages:
            err = m.error()
            if err is None:
                kept.append(m)
            elif err.code() == KafkaError._PARTITION_EOF:  # informational, not a failure
                continue
            elif err.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
                # auto.offset.reset=error: librdkafka stops fetching the partition until it is
                # assigned again; the message carries the partition and the refused offset.
                out_of_range[m.partition()] = m.offset()
            elif err.fatal():
                raise SourceClientError(f"fetch failed: {err}")
            elif transient is None:  # librdkafka reconnects and retries by itself
                transient = TransientClientError(f"fetch failed: {err}")
        error: SourceClientError | None = transient
        if out_of_range:  # the job's policy decides; it outranks a transient error
            error = FetchOutOfRange(f"fetch refused, offsets out of range: {out_of_range}", out_of_range)
        if error is not None:
            if not kept:
                raise error
            # The consumer has moved past the records fetched with the error: hand them out
            # now and report the error on the next poll, or they would be lost until a restart.
            self._pending_error = error
        return kept

    def position(self, topic: str, partition: int) -> int | None:
        from confluent_kafka import TopicPartition

        offset = self._consumer.position([TopicPartition(topic, partition)])[0].offset
        return int(offset) if offset >= 0 else None  # OFFSET_INVALID (-1001) before any fetch

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
                                           enable_auto_commit=False,
                                           # "none": poll raises OffsetOutOfRangeError for a
                                           # position the broker no longer has (the source's
                                           # policy decides) instead of silently moving.
                                           auto_offset_reset="none",
                                           **settings)
        except KafkaError as exc:  # NoBrokersAvailable when nothing answers at bootstrap
            raise SourceClientError(f"cannot reach Kafka at {bootstrap}: {exc!r}") from exc
        self._topic = ""

    def _tp(self, topic: str, partition: int):
        from kafka import TopicPartition

        return TopicPartition(topic, partition)

    def partitions(self, topic: str, timeout_s: float) -> list[int]:
        from kafka.errors import KafkaError

        try:
            self._consumer.topics()  # a metadata request: partitions_for_topic answers from its cache
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
        from kafka.errors import OffsetOutOfRangeError as KafkaOffsetOutOfRange

        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaOffsetOutOfRange as exc:  # args[0]: {TopicPartition: refused offset}
            refused = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            offsets = {tp.partition: int(o) for tp, o in refused.items()}
            raise FetchOutOfRange(f"fetch refused, offsets out of range: {offsets}", offsets) from exc
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

    def position(self, topic: str, partition: int) -> int | None:
        from kafka.errors import KafkaError

        try:  # known after assign() and seek(): answered locally (a zero timeout sends nothing)
            offset = self._consumer.position(self._tp(topic, partition), timeout_ms=0)
        except KafkaError:
            return None
        return int(offset) if offset is not None else None

    def close(self) -> None:
        self._consumer.close()
