"""The channel between whoever runs a job (the CLI, later the service) and its Ray Train workers:
reports flow out as they happen, a stop request flows in. A small Ray actor, so it works the
same on one machine and on a cluster."""

from __future__ import annotations

from collections import deque
from typing import Any

from ..report import JobReport

# Reports kept for a reader that stopped reading; older ones are dropped (metrics, not data).
MAX_PENDING_REPORTS = 1000


class JobChannel:
    """Held by a Ray actor (see :func:`open_channel`); every method is called remotely."""

    def __init__(self) -> None:
        self._reports: deque[JobReport] = deque(maxlen=MAX_PENDING_REPORTS)
        self._stop_reason: str | None = None

    def publish(self, report: JobReport) -> None:
        self._reports.append(report)

    def drain(self) -> list[JobReport]:
        """The reports published since the last call, oldest first."""
        out = list(self._reports)
        self._reports.clear()
        return out

    def request_stop(self, reason: str) -> None:
        """Ask the workers to checkpoint and stop; the first reason given is kept."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def stop_reason(self) -> str | None:
        return self._stop_reason


def open_channel() -> Any:
    """A new JobChannel actor (needs Ray initialised). It takes no CPU, so it never competes
    with the training workers for a slot."""
    import ray

    return ray.remote(num_cpus=0)(JobChannel).remote()


class StopWatch:
    """Rank 0's view of the channel's stop request, refreshed without ever blocking a step: one
    request is in flight at a time and its answer is picked up by a later call."""

    def __init__(self, channel: Any, *, every_s: float = 0.5, clock: Any = None) -> None:
        import time

        self._channel = channel
        self._every_s = every_s
        self._clock = clock or time.monotonic
        self._pending: Any = None
        self._asked_at = float("-inf")
        self.reason: str | None = None

    def poll(self) -> str | None:
        """The stop reason once one was requested, else None."""
        import ray

        if self.reason is not None or self._channel is None:
            return self.reason
        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if ready:
                self.reason, self._pending = ray.get(ready[0]), None
        now = self._clock()
        if self._pending is None and self.reason is None and now - self._asked_at >= self._every_s:
            self._pending, self._asked_at = self._channel.stop_reason.remote(), now
        return self.reason
