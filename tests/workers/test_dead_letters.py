"""The dead-letter sink: what happens when a dead letter cannot simply be produced and delivered."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from workers.kafka.broker import EmbeddedBroker
from workers.kafka.codecs import Rejection
from workers.kafka.dead_letters import (
    OFFSET_HEADER,
    REASON_HEADER,
    VALUE_DROPPED_HEADER,
    DeadLetterError,
    DeadLetterSink,
    DeadLettersPending,
    dlq_topic,
)
from workers.kafka.records import KafkaRecord
from workers.kafka.topics import ensure_topic


def _rejection(topic: str, offset: int, value: bytes | None) -> Rejection:
    return Rejection(KafkaRecord(topic, 0, offset, value, headers=(("trace", b"t1"),)), "not JSON")


def test_a_value_too_large_for_the_producer_is_dead_lettered_without_it(kafka_broker: EmbeddedBroker) -> None:
    # librdkafka refuses values over its message.max.bytes (1,000,000 by default) at produce();
    # the source may still deliver such a record (the broker's limit is its own). It used to
    # raise out of the train loop; now the dead letter goes without the value.
    topic = f"big-{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka_broker.bootstrap, dlq_topic(topic), 1)
    sink = DeadLetterSink(Producer({"bootstrap.servers": kafka_broker.bootstrap}))
    assert sink.send([_rejection(topic, 7, b"x" * 1_500_000), _rejection(topic, 8, b"small")]) == 2
    sink.flush()
    assert sink.counts[topic] == 2

    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": "big-check"})
    consumer.assign([TopicPartition(dlq_topic(topic), 0, 0)])
    msgs: list[Any] = []
    for _ in range(20):
        msgs += [m for m in consumer.consume(num_messages=10, timeout=0.5) if m.error() is None]
        if len(msgs) >= 2:
            break
    consumer.close()
    assert len(msgs) == 2
    big, small = (dict(m.headers()) for m in msgs)
    assert msgs[0].value() is None and big[OFFSET_HEADER] == b"7" and big[REASON_HEADER] == b"not JSON"
    assert b"1500000 bytes" in big[VALUE_DROPPED_HEADER] and big["trace"] == b"t1"
    assert msgs[1].value() == b"small" and VALUE_DROPPED_HEADER not in small


class _FlakyProducer:
    """Fills its local queue once, then fails or holds back deliveries as told."""

    def __init__(self, *, refuse: bool = False, hold_back: int = 0) -> None:
        self.refuse, self.hold_back = refuse, hold_back
        self.produced: list[bytes | None] = []
        self.polls = 0
        self._callbacks: list[Any] = []
        self._full_once = True

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None) -> None:
        if self._full_once:
            self._full_once = False
            raise BufferError("Local: Queue full")
        self.produced.append(value)
        self._callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        return 0

    def flush(self, timeout: float = 0) -> int:
        for callback in self._callbacks:
            callback("Broker: Topic authorization failed" if self.refuse else None, None)
        self._callbacks = []
        return self.hold_back


def test_a_full_local_queue_is_waited_out_not_dropped() -> None:
    producer = _FlakyProducer()
    sink = DeadLetterSink(producer)
    assert sink.send([_rejection("t", 1, b"a"), _rejection("t", 2, b"b")]) == 2
    sink.flush()
    assert producer.produced == [b"a", b"b"] and producer.polls == 1


def test_refused_or_undelivered_dead_letters_fail_the_flush() -> None:
    refused = DeadLetterSink(_FlakyProducer(refuse=True))
    refused.send([_rejection("t", 1, b"a")])
    with pytest.raises(DeadLetterError, match=r"1 dead letter.*refused.*authorization") as caught:
        refused.flush()
    assert not isinstance(caught.value, DeadLettersPending)  # retrying will not help: the job fails

    pending = DeadLetterSink(_FlakyProducer(hold_back=1))
    pending.send([_rejection("t", 1, b"a")])
    with pytest.raises(DeadLettersPending, match=r"1 dead letter.*not delivered within 0\.5 s"):
        pending.flush(0.5)


class _UnknownTopicProducer(_FlakyProducer):
    """Refuses at produce(), as librdkafka does for a topic it knows to be invalid."""

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None) -> None:
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "Local: Unknown topic"))


def test_a_refusal_is_reported_at_the_next_step_not_raised_mid_step() -> None:
    # send() runs on one rank in the middle of a step: raising there would strand the other ranks
    # in the step's collective. The refusal waits for refused() (every step) or flush().
    delivering = _FlakyProducer(refuse=True)
    sink = DeadLetterSink(delivering)
    assert sink.refused() is None and delivering.polls == 0  # nothing out: no poll at all
    sink.send([_rejection("t", 1, b"a")])
    delivering.flush()  # the delivery report arrives (librdkafka serves it in a poll)
    assert sink.refused() == "Broker: Topic authorization failed"

    queueing = DeadLetterSink(_UnknownTopicProducer())
    assert queueing.send([_rejection("t", 2, b"b")]) == 1
    assert "cannot queue a dead letter for t.dlq" in (queueing.refused() or "")
    with pytest.raises(DeadLetterError, match=r"refused by the broker: cannot queue a dead letter for t\.dlq"):
        queueing.flush()
