"""Dead-letter routing: every rejected record goes to ``<topic>.dlq`` with why and where from.

Delivery is AT LEAST ONCE. A checkpoint counts a rejected record as consumed only once its dead
letter is delivered, but dead letters sent after the last checkpoint are sent again when the job
resumes from it (after a crash or a failure), as their records are read again. A reader of the
dead-letter topic dedupes on the source identity every letter carries: the
``cicw.dlq.source.topic``, ``cicw.dlq.source.partition`` and ``cicw.dlq.source.offset`` headers.

A dead letter the broker refuses for good (ACL, missing topic) fails the job: the train loop
asks :meth:`DeadLetterSink.refused` at every step and flushes at every checkpoint, and all
ranks decide together (workers.train.decisions), so every rank stops with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..errors import DeadLetterError, DeadLettersPending
from .codecs import Rejection
from .producing import Producer, produce_waiting

DLQ_SUFFIX = ".dlq"
# Header names on dead-lettered records; the original headers follow them unchanged.
REASON_HEADER = "cicw.dlq.reason"
TOPIC_HEADER = "cicw.dlq.source.topic"
PARTITION_HEADER = "cicw.dlq.source.partition"
OFFSET_HEADER = "cicw.dlq.source.offset"
# Set when the value was left out because the producer may not send it (message.max.bytes); the
# source topic, partition and offset headers still say where the record is.
VALUE_DROPPED_HEADER = "cicw.dlq.value_dropped"


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


class DeadLetterSink:
    """Sends rejections to their dead-letter topic and counts them per source topic.

    :meth:`send` queues; :meth:`flush` waits for delivery and raises DeadLetterError if any
    remain or failed, so a checkpoint that covers rejected offsets is written only after they
    are safe; :meth:`refused` says, without waiting, whether the broker refused one. A value
    too large for the producer goes without its value (VALUE_DROPPED_HEADER says so) rather
    than stopping the job: a bad record never crashes it.
    """

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self.counts: Counter[str] = Counter()
        # Refusals since the last flush: delivery errors, and letters that could not be queued.
        self._failed: list[str] = []
        self._in_flight = 0  # queued, delivery not reported yet

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
                produce_waiting(self._producer, topic, value=value, key=key, headers=headers,
                                on_delivery=self._delivered)
                self._in_flight += 1
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE or value is None:
                    # Not raised here, on one rank in the middle of a step: the job fails through
                    # the ranks' shared decision (refused() at the step, flush() at a checkpoint).
                    self._failed.append(f"cannot queue a dead letter for {topic}: {exc}")
                    return
                headers = [*headers, (VALUE_DROPPED_HEADER, f"{len(value)} bytes: {exc.args[0].str()}".encode())]
                value = None

    def _delivered(self, error: Any, _message: Any) -> None:
        self._in_flight -= 1
        if error is not None:
            self._failed.append(str(error))

    def refused(self) -> str | None:
        """The first dead letter refused since the last flush (None if none), after taking the
        delivery reports that arrived; never waits (one non-blocking poll while letters are out)."""
        if self._in_flight:
            self._producer.poll(0)
        return self._failed[0] if self._failed else None

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
