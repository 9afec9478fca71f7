"""Producing without losing a record to a full local queue: confluent-kafka's ``produce`` raises
BufferError when its queue (``queue.buffering.max.messages``) is full; the record was not queued,
so the caller must let deliveries drain the queue and try again, never drop it."""

from __future__ import annotations

from typing import Any, Protocol

# How long one wait for deliveries lasts before the record is offered again: long enough for a
# batch to leave (linger.ms is 5-20 ms in this project), short enough to keep the queue fed.
DRAIN_WAIT_S = 0.1


class Producer(Protocol):
    """The part of a Kafka producer this project uses (confluent_kafka.Producer fits)."""

    def produce(self, topic: str, *args: Any, **kwargs: Any) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


def produce_waiting(producer: Producer, topic: str, **record: Any) -> None:
    """``producer.produce(topic, **record)``, waiting for room in the local queue as long as it is
    full. Other errors (a record too large, an unknown partition) propagate to the caller."""
    while True:
        try:
            producer.produce(topic, **record)
            return
        except BufferError:
            producer.poll(DRAIN_WAIT_S)
