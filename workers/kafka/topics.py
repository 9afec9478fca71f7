"""Topic administration through the standard admin API (works on the embedded broker and Kafka)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .clients import SourceClientError

# Kafka's rule for topic names (brokers refuse others, for good).
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def check_topic_name(topic: str) -> None:
    """Raise SourceClientError naming ``topic`` unless Kafka accepts it as a topic name."""
    if topic in (".", "..") or not _LEGAL_TOPIC.fullmatch(topic):
        raise SourceClientError(f"{topic!r} is not a valid Kafka topic name (at most 249 characters of "
                                f"a-z, A-Z, 0-9, '.', '_', '-'; got {len(topic)})")


def ensure_topic(bootstrap: str, topic: str, partitions: int, config: Mapping[str, str] | None = None,
                 timeout_s: float = 10.0) -> int:
    """Create ``topic`` with ``partitions`` unless it exists; returns its partition count. A
    name Kafka would refuse raises SourceClientError (some brokers, the embedded one among them,
    accept it and fail later)."""
    check_topic_name(topic)
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
