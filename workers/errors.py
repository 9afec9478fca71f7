"""The project's exceptions: one root, :class:`CicwStreamError`, with a typed leaf per failure a
caller can act on. Callers (the runner's preflight, the CLI, the service) catch the root or a
leaf, never bare ``Exception``, so a genuine bug surfaces as a bug rather than as a failed job.

Every class here takes one message argument, so it pickles across Ray process boundaries.
This module imports nothing heavy: the service imports it without torch, Ray or a Kafka client.
"""

from __future__ import annotations


class CicwStreamError(Exception):
    """Root of every error this project raises on purpose."""


class RecordRejected(CicwStreamError, ValueError):
    """A record's bytes or contents are invalid; ``reason`` says which check failed. The record
    goes to the dead-letter topic; the job goes on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelError(CicwStreamError, ValueError):
    """The job's model cannot be built: an unknown name, a package not allow-listed, bad options."""


class SourceClientError(CicwStreamError, RuntimeError):
    """The Kafka client failed (broker unreachable, unknown topic, ...); wraps the library's error."""


class TransientClientError(SourceClientError):
    """A failure the client recovers from by itself (broker down, request timed out): the source
    reports a stall and keeps polling rather than failing the job."""


class SourceStalledError(SourceClientError):
    """The broker stayed unreachable past the job's ``source.stall_deadline_s``."""


class OffsetOutOfRangeError(SourceClientError):
    """A position to resume from is no longer on the broker (retention deleted it, or the topic
    was recreated); the job fails unless its spec opts into a reset policy."""


class DeadLetterError(CicwStreamError, RuntimeError):
    """Dead letters were refused or could not be delivered; the caller must not commit past them."""


class DeadLettersPending(DeadLetterError):
    """Dead letters are still queued (broker unreachable): they may yet be delivered."""


class CheckpointError(CicwStreamError, RuntimeError):
    """A checkpoint cannot be used: unreadable, of another format version, or written for other
    data (another job, topic or codec) than the spec resuming from it."""


class EvaluationError(CicwStreamError, RuntimeError):
    """The clean evaluation set cannot be read."""


class DatasetError(CicwStreamError, ValueError):
    """A dataset file is missing or malformed (development and benchmark data)."""


class BrokerError(CicwStreamError, RuntimeError):
    """The embedded development broker failed to start or stop."""


class RayClusterError(CicwStreamError, RuntimeError):
    """The Ray cluster a caller named cannot be reached (nothing listens at its address)."""
