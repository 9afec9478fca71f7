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

from ..errors import DeadLetterError, DeadLettersPending
from .codecs import Rejection
from .delivery import VALUE_DROPPED_HEADER, DeliverySink
from .producing import Producer

DLQ_SUFFIX = ".dlq"
# Header names on dead-lettered records; the original headers follow them unchanged.
REASON_HEADER = "cicw.dlq.reason"
TOPIC_HEADER = "cicw.dlq.source.topic"
PARTITION_HEADER = "cicw.dlq.source.partition"
OFFSET_HEADER = "cicw.dlq.source.offset"

__all__ = ["DLQ_SUFFIX", "OFFSET_HEADER", "PARTITION_HEADER", "REASON_HEADER", "TOPIC_HEADER",
           "VALUE_DROPPED_HEADER", "DeadLetterError", "DeadLetterSink", "DeadLettersPending", "dlq_topic"]


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


class DeadLetterSink(DeliverySink):
    """Sends rejections to their dead-letter topic and counts them per source topic.

    :meth:`send` queues; :meth:`flush` waits for delivery and raises DeadLetterError if any
    remain or failed, so a checkpoint that covers rejected offsets is written only after they
    are safe; :meth:`refused` says, without waiting, whether the broker refused one (see
    workers.kafka.delivery). A bad record never crashes the job.
    """

    def __init__(self, producer: Producer) -> None:
        super().__init__(producer, "dead letter")
        self.counts: Counter[str] = Counter()

    def send(self, rejections: Iterable[Rejection]) -> int:
        sent = 0
        for r in rejections:
            rec = r.record
            headers = [(REASON_HEADER, r.reason.encode()), (TOPIC_HEADER, rec.topic.encode()),
                       (PARTITION_HEADER, str(rec.partition).encode()),
                       (OFFSET_HEADER, str(rec.offset).encode()), *rec.headers]
            self.produce(dlq_topic(rec.topic), rec.value, rec.key, headers)
            self.counts[rec.topic] += 1
            sent += 1
        return sent
