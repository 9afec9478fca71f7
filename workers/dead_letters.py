"""Dead-letter routing: every rejected record goes to ``<topic>.dlq`` with why and where from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from .codecs import Rejection

DLQ_SUFFIX = ".dlq"
# Header names on dead-lettered records; the original headers follow them unchanged.
REASON_HEADER = "cicw.dlq.reason"
TOPIC_HEADER = "cicw.dlq.source.topic"
PARTITION_HEADER = "cicw.dlq.source.partition"
OFFSET_HEADER = "cicw.dlq.source.offset"


class Producer(Protocol):
    """The part of a Kafka producer the sink uses (confluent_kafka.Producer fits)."""

    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ...,
                headers: list[tuple[str, bytes]] | None = ...) -> None: ...

    def flush(self, timeout: float = ...) -> int: ...


class DeadLetterError(RuntimeError):
    """Dead letters could not be delivered in time; the caller must not commit past them."""


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


class DeadLetterSink:
    """Sends rejections to their dead-letter topic and counts them per source topic.

    :meth:`send` queues; :meth:`flush` waits for delivery and raises DeadLetterError if any
    remain, so a checkpoint that covers rejected offsets is written only after they are safe.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.counts: Counter[str] = Counter()

    def send(self, rejections: Iterable[Rejection]) -> int:
        sent = 0
        for r in rejections:
            rec = r.record
            headers = [(REASON_HEADER, r.reason.encode()), (TOPIC_HEADER, rec.topic.encode()),
                       (PARTITION_HEADER, str(rec.partition).encode()),
                       (OFFSET_HEADER, str(rec.offset).encode()), *rec.headers]
            self._producer.produce(dlq_topic(rec.topic), value=rec.value, key=rec.key, headers=headers)
            self.counts[rec.topic] += 1
            sent += 1
        return sent

    def flush(self, timeout_s: float = 10.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeadLetterError(f"{remaining} dead letter(s) not delivered within {timeout_s:.0f} s")
