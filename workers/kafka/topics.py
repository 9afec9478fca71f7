"""Topic administration through the standard admin API (works on the embedded broker and Kafka)."""

from __future__ import annotations

from collections.abc import Mapping

from .clients import SourceClientError


def ensure_topic(bootstrap: str, topic: str, partitions: int, config: Mapping[str, str] | None = None,
                 timeout_s: float = 10.0) -> int:
    """Create ``topic`` with ``partitions`` unless it exists; returns its partition count."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **(config or {})})
    try:
        existing = admin.list_topics(timeout=timeout_s).topics.get(topic)
        if existing is not None and existing.partitions:
            return len(existing.partitions)
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(
            timeout=timeout_s)
    except KafkaException as exc:
        raise SourceClientError(f"cannot create topic {topic!r} on {bootstrap}: {exc}") from exc
    return partitions
