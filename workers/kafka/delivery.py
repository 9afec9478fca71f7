"""Producing records the job must not lose: what dead letters and suspect records share.

A :class:`DeliverySink` queues records on a producer and tracks their delivery, so that the
train loop can hold a checkpoint back until every record it sent is safe: :meth:`refused` says,
without waiting, whether the broker refused one (asked at every step, so all ranks stop
together); :meth:`flush` waits at a checkpoint and raises DeadLettersPending (still queued: the
checkpoint is postponed) or DeadLetterError (refused for good: the job fails). Delivery is at
least once: records sent after the last checkpoint are sent again when the job resumes from it.
Several sinks may share one producer (one connection per rank); each tracks its own records.
"""

from __future__ import annotations

from typing import Any

from ..errors import DeadLetterError, DeadLettersPending
from .producing import Producer, produce_waiting

# Set when the value was left out because the producer may not send it (message.max.bytes); the
# other headers still say where the record came from.
VALUE_DROPPED_HEADER = "cicw.dlq.value_dropped"


class DeliverySink:
    """Queues records and tracks their delivery (see the module docstring). ``noun`` names one
    record in errors ("dead letter", "suspect record"). A value too large for the producer goes
    without its value (VALUE_DROPPED_HEADER says so) rather than stopping the job."""

    def __init__(self, producer: Producer, noun: str) -> None:
        self._producer = producer
        self.noun = noun
        # Refusals since the last flush: delivery errors, and records that could not be queued.
        self._failed: list[str] = []
        self._in_flight = 0  # queued, delivery not reported yet

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        """Queue one record (waiting for room in the local queue); never raises for the broker's
        refusal: that is reported by :meth:`refused` and :meth:`flush`."""
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
                    self._failed.append(f"cannot queue a {self.noun} for {topic}: {exc}")
                    return
                headers = [*headers, (VALUE_DROPPED_HEADER, f"{len(value)} bytes: {exc.args[0].str()}".encode())]
                value = None

    def _delivered(self, error: Any, _message: Any) -> None:
        self._in_flight -= 1
        if error is not None:
            self._failed.append(str(error))

    def refused(self) -> str | None:
        """The first record refused since the last flush (None if none), after taking the
        delivery reports that arrived; never waits (one non-blocking poll while records are out)."""
        if self._in_flight:
            self._producer.poll(0)
        return self._failed[0] if self._failed else None

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait up to ``timeout_s`` for every record sent so far to be delivered.

        Raises DeadLettersPending if some are still queued (they stay queued, and a later flush
        may succeed), DeadLetterError if the broker refused some.
        """
        remaining = self._producer.flush(timeout_s)
        failed, self._failed = self._failed, []
        if failed:
            raise DeadLetterError(f"{len(failed)} {self.noun}(s) refused by the broker: {failed[0]}")
        if remaining:
            # A shared producer counts every sink's records: the queue, not only this sink's.
            raise DeadLettersPending(f"{remaining} {self.noun}(s) not delivered within {timeout_s:g} s")
