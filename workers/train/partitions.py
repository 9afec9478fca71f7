"""Partitions added to the topic while a job runs: taken up at a checkpoint boundary, by every
rank at once (partition p goes to rank p mod W, so all ranks must agree on the count)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .collectives import Collectives

log = logging.getLogger(__name__)


class GrowingSource(Protocol):
    """What the hook needs of a source (workers.kafka.source.KafkaSource)."""

    def topic_partition_count(self) -> int | None:
        """The topic's partition count as last seen (None while unknown); never blocks."""

    def add_partitions(self, count: int) -> list[int]:
        """Start reading this rank's share of partitions below ``count`` it does not read yet;
        returns those partitions."""


def refresh_partitions(source: GrowingSource, collectives: Collectives, known: int) -> int:
    """Agree on the topic's partition count (the largest any rank's source saw) and, when it
    exceeds ``known``, have every rank take up its share of the new partitions. Returns the count
    the job now reads. One collective; call on every rank at the same checkpoint boundary."""
    seen = source.topic_partition_count()
    agreed = int(collectives.max(float(seen if seen is not None else -1)))
    if agreed <= known:
        return known
    added = source.add_partitions(agreed)
    log.info("topic grew from %d to %d partitions; this rank now also reads %s", known, agreed, added)
    return agreed


@dataclass
class PartitionWatch:
    """When to look for new partitions: at a checkpoint boundary once ``every_s`` passed. Asking
    the broker takes a metadata round trip, so it is not done at every checkpoint; ranks' clocks
    differ, so they first agree that it is due (one all-reduce), then on the count."""

    source: GrowingSource
    every_s: float
    known: int
    clock: Callable[[], float] = time.monotonic
    last: float = field(init=False)

    def __post_init__(self) -> None:
        self.last = self.clock()

    def at_checkpoint(self, collectives: Collectives) -> int:
        """The partition count the job reads after this checkpoint boundary. Every rank calls it."""
        if not collectives.max(float(self.clock() - self.last >= self.every_s)):
            return self.known
        self.last = self.clock()
        self.known = refresh_partitions(self.source, collectives, self.known)
        return self.known
