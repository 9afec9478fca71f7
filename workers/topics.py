"""Topic administration through the standard admin API (works on the embedded broker and Kafka)."""

from __future__ import annotations

from collections.abc import Mapping

from .kafka_clients import SourceClientError


def ensure_topic(bootstrap: str, topic: str, partitions: int, config: Mapping[str, str] | None = None,
                 timeout_s: float = 10.0) -> bool:
    """Create ``topic`` with ``partitions`` unless it exists. Returns True if it was created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **(config or {})})
    try:
        if topic in admin.list_topics(timeout=timeout_s).topics:
            return False
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(
            timeout=timeout_s)
    except KafkaException as exc:
        raise SourceClientError(f"cannot create topic {topic!r} on {bootstrap}: {exc}") from exc
    return True
