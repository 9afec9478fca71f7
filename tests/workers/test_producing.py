"""produce_waiting: a full local queue is waited out, never a dropped record."""

from __future__ import annotations

from typing import Any

import pytest

from workers.kafka.producing import produce_waiting


class QueueFullTwice:
    """Refuses the first two produce calls as confluent-kafka does when its local queue is full."""

    def __init__(self) -> None:
        self.refusals = 2
        self.polls = 0
        self.queued: list[tuple[str, dict[str, Any]]] = []

    def produce(self, topic: str, **record: Any) -> None:
        if self.refusals:
            self.refusals -= 1
            raise BufferError("Local: Queue full")
        self.queued.append((topic, record))

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


def test_a_full_queue_is_drained_and_the_record_queued_once() -> None:
    producer = QueueFullTwice()
    produce_waiting(producer, "t", value=b"v", partition=1, headers=[("h", b"1")])
    assert producer.queued == [("t", {"value": b"v", "partition": 1, "headers": [("h", b"1")]})]
    assert producer.polls == 2


def test_other_errors_reach_the_caller() -> None:
    class Refusing(QueueFullTwice):
        def produce(self, topic: str, **record: Any) -> None:
            raise ValueError("unknown partition")

    with pytest.raises(ValueError, match="unknown partition"):
        produce_waiting(Refusing(), "t", value=b"v")
