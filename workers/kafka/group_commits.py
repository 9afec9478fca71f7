"""Committing checkpointed offsets to the consumer group ``cicw-<job_id>``, off the train loop.

The commit only tells standard lag tools how far the job is; the checkpoint is the source of
truth on resume. So a commit must never hold up or fail training: during a broker outage
librdkafka's commit (and the consumer's close while one is in flight) blocks until the broker
answers, however long that is. A thread of its own therefore does the committing; the loop
hands it the latest offsets and moves on, and a newer hand-off supersedes an older one that
has not gone out yet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class CommitClient(Protocol):
    """What the committer needs of a Kafka consumer (see :func:`confluent_committer`)."""

    def commit_offsets(self, topic: str, offsets: dict[int, int]) -> None: ...

    def close(self) -> None: ...


class GroupCommitter:
    """Commits the latest offsets handed to :meth:`submit`, in a background thread.

    A failed commit is retried every ``retry_s`` until it lands, newer offsets replace it, or
    :meth:`close` gives up.
    ``committed`` is the last set that landed, ``last_error`` the latest failure.
    """

    def __init__(self, topic: str, connect: Callable[[], CommitClient], *, retry_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._topic, self._connect, self._retry_s, self._sleep = topic, connect, retry_s, sleep
        self._cond = threading.Condition()
        self._pending: dict[int, int] | None = None
        self._closing = self._busy = self._exited = self._given_up = False
        self.committed: dict[int, int] = {}
        self.last_error: str | None = None
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, offsets: dict[int, int]) -> None:
        """Commit these offsets soon; never blocks."""
        with self._cond:
            self._pending = dict(offsets)
            self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> bool:
        """Wait up to ``timeout_s`` for the latest offsets to land, then stop; True if they did.

        When they did not (the broker is unreachable), the thread may stay blocked in the
        client: a daemon that ends with the process, rather than hold up the job's end.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._exited, timeout_s)
            self._given_up = True  # a retry still to come is not made
            return self._pending is None and not self._busy

    def _run(self) -> None:
        client: CommitClient | None = None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self._closing)
                    if self._pending is None:
                        return
                    offsets, self._pending, self._busy = self._pending, None, True
                try:
                    client = client or self._connect()
                    client.commit_offsets(self._topic, offsets)
                except Exception as exc:  # any client failure: retried, never raised into training
                    with self._cond:
                        self.failures += 1
                        self.last_error = f"{type(exc).__name__}: {exc}"
                        if self._pending is None:
                            self._pending = offsets  # retry, unless newer offsets arrived meanwhile
                        self._busy = False
                        if self._given_up:
                            return
                    self._sleep(self._retry_s)
                    continue
                with self._cond:
                    self.committed, self._busy = offsets, False
        finally:
            with self._cond:
                self._busy, self._exited = False, True
                self._cond.notify_all()
            if client is not None:
                client.close()  # may block while the broker is away: this thread alone waits


class _ConfluentCommitClient:
    def __init__(self, config: dict[str, object]) -> None:
        from confluent_kafka import Consumer

        self._consumer = Consumer({**config, "enable.auto.commit": False})

    def commit_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        from confluent_kafka import TopicPartition

        self._consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in sorted(offsets.items())],
                              asynchronous=False)

    def close(self) -> None:
        self._consumer.close()


def confluent_committer(topic: str, bootstrap_servers: str, group_id: str,
                        client_config: dict[str, object]) -> GroupCommitter:
    """A committer for ``group_id`` over confluent-kafka (any Kafka-protocol broker)."""
    config = {"bootstrap.servers": bootstrap_servers, "group.id": group_id, **client_config}
    return GroupCommitter(topic, lambda: _ConfluentCommitClient(config))
