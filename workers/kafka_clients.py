"""The narrow Kafka client interface the source needs, with two backends: confluent-kafka
(default, ~50x faster here) and kafka-python (pure Python). Both use assign(), never
consumer-group subscription, so no rebalances; settings such as SASL/SSL pass through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from .records import KafkaRecord

ClientName = Literal["confluent", "kafka-python"]


class SourceClientError(RuntimeError):
    """The Kafka client failed (broker unreachable, unknown topic, ...); wraps the library's error."""


class TransientClientError(SourceClientError):
    """A failure the client recovers from by itself (broker down, request timed out): the source
    reports a stall and keeps polling rather than failing the job."""


class PartitionClient(Protocol):
    def partitions(self, topic: str, timeout_s: float) -> list[int]: ...
    def assign(self, topic: str, positions: Mapping[int, int]) -> None: ...
    def watermarks(self, topic: str, partition: int, timeout_s: float) -> tuple[int, int]: ...
    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int,
                         timeout_s: float) -> dict[int, int]: ...
    def poll(self, max_records: int, timeout_s: float) -> list[KafkaRecord]: ...
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
        from confluent_kafka import Consumer

        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group_id,
                                   "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                   **config})

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

    def poll(self, max_records: int, timeout_s: float) -> list[KafkaRecord]:
        from confluent_kafka import KafkaError

        out = []
        for m in self._consumer.consume(num_messages=max_records, timeout=timeout_s):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # informational, not a failure
                    continue
                # librdkafka reconnects and retries by itself unless the error is fatal.
                raise (SourceClientError if err.fatal() else TransientClientError)(f"fetch failed: {err}")
            ts_type, ts = m.timestamp()
            out.append(KafkaRecord(m.topic(), m.partition(), m.offset(), m.value(), m.key(),
                                   tuple((k, v if v is not None else b"") for k, v in (m.headers() or ())),
                                   ts if ts_type else None))
        return out

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

    def poll(self, max_records: int, timeout_s: float) -> list[KafkaRecord]:
        from kafka.errors import KafkaError

        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as exc:
            if getattr(exc, "retriable", False):
                raise TransientClientError(f"fetch failed: {exc!r}") from exc
            raise SourceClientError(f"fetch failed: {exc!r}") from exc
        return [KafkaRecord(r.topic, r.partition, r.offset, r.value, r.key,
                            tuple((k, v if v is not None else b"") for k, v in (r.headers or ())), r.timestamp)
                for records in batches.values() for r in records]

    def cached_high_watermark(self, topic: str, partition: int) -> int | None:
        return self._consumer.highwater(self._tp(topic, partition))

    def close(self) -> None:
        self._consumer.close()
