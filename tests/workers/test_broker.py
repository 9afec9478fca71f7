"""The embedded broker through standard Kafka clients (both backends), and its command line."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from workers.kafka.broker import BrokerError, EmbeddedBroker, free_port


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive its futures
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=10)
    return name


def _produce(bootstrap: str, topic: str, n: int, partitions: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, value=f"record-{i}".encode(), partition=i % partitions)
    assert producer.flush(10) == 0


def test_round_trip_with_both_clients_and_manual_assignment(kafka_broker: EmbeddedBroker) -> None:
    topic = _topic(kafka_broker.bootstrap, 4)
    _produce(kafka_broker.bootstrap, topic, 200, 4)

    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": f"cicw-{topic}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    seen: set[bytes] = set()
    for _ in range(50):
        for msg in consumer.consume(num_messages=500, timeout=0.5):
            assert msg.error() is None
            seen.add(msg.value())
        if len(seen) == 200:
            break
    assert seen == {f"record-{i}".encode() for i in range(200)}

    # offsets committed for a group with manual assignment read back (lag tools rely on this)
    consumer.commit(offsets=[TopicPartition(topic, p, 50) for p in range(4)], asynchronous=False)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    assert [tp.offset for tp in committed] == [50, 50, 50, 50]
    consumer.close()

    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTopicPartition

    kc = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap, enable_auto_commit=False)
    kc.assign([KTopicPartition(topic, p) for p in range(4)])
    kc.seek_to_beginning()
    values: set[bytes] = set()
    for _ in range(50):
        for records in kc.poll(timeout_ms=500).values():
            values.update(r.value for r in records)
        if len(values) == 200:
            break
    kc.close()
    assert values == seen


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(BrokerError, match=r"no Tansu broker binary.*CALF_TANSU_BIN"):
        EmbeddedBroker().start()


def test_cli_prints_bootstrap_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "broker", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == f"127.0.0.1:{port}"
        AdminClient({"bootstrap.servers": line}).list_topics(timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    with pytest.raises(KafkaException):  # the port is closed again once the command returned
        AdminClient({"bootstrap.servers": line, "socket.connection.setup.timeout.ms": 1000}).list_topics(timeout=2)
