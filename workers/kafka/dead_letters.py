"""Dead-letter routing: every rejected record goes to ``<topic>.dlq`` with why and where from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .codecs import Rejection
from ..errors import DeadLetterError, DeadLettersPending

DLQ_SUFFIX = ".dlq"
# Header names on dead-lettered records; the original headers follow them unchanged.
REASON_HEADER = "cicw.dlq.reason"
TOPIC_HEADER = "cicw.dlq.source.topic"
PARTITION_HEADER = "cicw.dlq.source.partition"
OFFSET_HEADER = "cicw.dlq.source.offset"
# Set when the value was left out because the producer may not send it (message.max.bytes); the
# source topic, partition and offset headers still say where the record is.
VALUE_DROPPED_HEADER = "cicw.dlq.value_dropped"


class Producer(Protocol):
    """The part of a Kafka producer the sink uses (confluent_kafka.Producer fits)."""

    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ...,
                headers: list[tuple[str, bytes]] | None = ...,
                on_delivery: Callable[[Any, Any], None] | None = ...) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


class DeadLetterSink:
    """Sends rejections to their dead-letter topic and counts them per source topic.

    :meth:`send` queues; :meth:`flush` waits for delivery and raises DeadLetterError if any
    remain or failed, so a checkpoint that covers rejected offsets is written only after they
    are safe. A value too large for the producer goes without its value (VALUE_DROPPED_HEADER
    says so) rather than stopping the job: a bad record never crashes it.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.counts: Counter[str] = Counter()
        self._failed: list[str] = []  # delivery errors since the last flush

    def send(self, rejections: Iterable[Rejection]) -> int:
        sent = 0
        for r in rejections:
            rec = r.record
            headers = [(REASON_HEADER, r.reason.encode()), (TOPIC_HEADER, rec.topic.encode()),
                       (PARTITION_HEADER, str(rec.partition).encode()),
                       (OFFSET_HEADER, str(rec.offset).encode()), *rec.headers]
            self._produce(dlq_topic(rec.topic), rec.value, rec.key, headers)
            self.counts[rec.topic] += 1
            sent += 1
        return sent

    def _produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        from confluent_kafka import KafkaError, KafkaException

        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._delivered)
                return
            except BufferError:  # the producer's local queue is full: let deliveries drain it
                self._producer.poll(0.1)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE or value is None:
                    raise DeadLetterError(f"cannot queue a dead letter for {topic}: {exc}") from exc
                headers = [*headers, (VALUE_DROPPED_HEADER, f"{len(value)} bytes: {exc.args[0].str()}".encode())]
                value = None

    def _delivered(self, error: Any, _message: Any) -> None:
        if error is not None:
            self._failed.append(str(error))

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for every dead letter sent so far to be delivered.

        Raises DeadLettersPending if some are still queued (they stay queued, and a later flush
        may succeed), DeadLetterError if the broker refused some.
        """
        remaining = self._producer.flush(timeout_s)
        failed, self._failed = self._failed, []
        if failed:
            raise DeadLetterError(f"{len(failed)} dead letter(s) refused by the broker: {failed[0]}")
        if remaining:
            raise DeadLettersPending(f"{remaining} dead letter(s) not delivered within {timeout_s:g} s")
